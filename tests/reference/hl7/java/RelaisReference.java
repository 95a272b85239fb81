import java.io.*;
import java.nio.charset.StandardCharsets;
import java.nio.file.*;
import java.util.*;
import java.util.stream.*;
import org.hl7.fhir.r4.formats.IParser.OutputStyle;
import org.hl7.fhir.r5.elementmodel.Manager.FhirFormat;
import org.hl7.fhir.utilities.FhirPublication;
import org.hl7.fhir.utilities.npm.NpmPackage;
import org.hl7.fhir.utilities.validation.ValidationMessage;
import org.hl7.fhir.validation.ValidationEngine;
import org.hl7.fhir.validation.instance.InstanceValidator;

/**
 * Relais's reference-validator harness: the HL7 FHIR validator engine, offline, base FHIR R4 only.
 *
 *   RelaisReference package <packages-dir>
 *       writes hl7.fhir.r4.core#4.0.1 (one JSON file per definition in hapi-fhir-validation-resources-r4)
 *       and the empty hl7.fhir.xver-extensions#0.1.0 the engine insists on loading.
 *   RelaisReference validate <in-dir> <out.jsonl> [warm-rounds]
 *       starts the engine once, validates every *.json of <in-dir> (sorted by name), and writes one
 *       JSON line per file: {"file", "ms", "messages": [{"level", "id", "location", "text"}]}.
 *       With warm-rounds > 0 each file is first validated that many times (JIT warm-up), so "ms" is
 *       the steady-state cost the benchmark compares against.
 * Run with -Duser.home=<dir holding .fhir/packages> so the engine finds the package offline.
 */
public class RelaisReference {
  private static final String DEFS = "org/hl7/fhir/r4/model/";
  private static final String[] XML_BUNDLES = {
      "profile/profiles-types.xml", "profile/profiles-resources.xml", "profile/profiles-others.xml",
      "extension/extension-definitions.xml", "valueset/valuesets.xml", "valueset/v2-tables.xml",
      "valueset/v3-codesystems.xml"};

  public static void main(String[] args) throws Exception {
    if (args.length >= 2 && args[0].equals("package")) {
      writePackages(Paths.get(args[1]));
    } else if (args.length >= 3 && args[0].equals("validate")) {
      validate(Paths.get(args[1]), Paths.get(args[2]), args.length > 3 ? Integer.parseInt(args[3]) : 0);
    } else {
      System.err.println("usage: RelaisReference package <dir> | validate <in-dir> <out.jsonl> [warm-rounds]");
      System.exit(2);
    }
  }

  // --- the offline package cache ----------------------------------------------------------------

  private static void writePackages(Path root) throws IOException {
    Path core = root.resolve("hl7.fhir.r4.core#4.0.1/package");
    Files.createDirectories(core);
    org.hl7.fhir.r4.formats.JsonParser json = new org.hl7.fhir.r4.formats.JsonParser();
    json.setOutputStyle(OutputStyle.NORMAL);
    Set<String> written = new HashSet<>();
    for (String name : XML_BUNDLES) {
      try (InputStream in = RelaisReference.class.getClassLoader().getResourceAsStream(DEFS + name)) {
        if (in == null) throw new FileNotFoundException(DEFS + name + " is not on the classpath");
        org.hl7.fhir.r4.model.Bundle bundle = (org.hl7.fhir.r4.model.Bundle) new org.hl7.fhir.r4.formats.XmlParser().parse(in);
        for (org.hl7.fhir.r4.model.Bundle.BundleEntryComponent e : bundle.getEntry()) {
          org.hl7.fhir.r4.model.Resource r = e.getResource();
          if (r == null || !r.hasId()) continue;
          String file = r.fhirType() + "-" + r.getIdElement().getIdPart() + ".json";
          if (!written.add(file)) continue;  // the first definition of an id wins, as in the spec's own package
          try (OutputStream out = Files.newOutputStream(core.resolve(file))) { json.compose(out, r); }
        }
      }
    }
    Files.writeString(core.resolve("package.json"), "{\"name\":\"hl7.fhir.r4.core\",\"version\":\"4.0.1\",\"type\":\"Core\","
        + "\"canonical\":\"http://hl7.org/fhir\",\"fhirVersions\":[\"4.0.1\"],\"dependencies\":{}}\n");
    Path xver = root.resolve("hl7.fhir.xver-extensions#0.1.0/package");
    Files.createDirectories(xver);
    Files.writeString(xver.resolve("package.json"), "{\"name\":\"hl7.fhir.xver-extensions\",\"version\":\"0.1.0\","
        + "\"type\":\"IG\",\"fhirVersions\":[\"5.0.0\"],\"dependencies\":{}}\n");
    NpmPackage.fromFolder(core.getParent().toString());  // writes .index.json now rather than on first use
    NpmPackage.fromFolder(xver.getParent().toString());
    Files.writeString(root.resolve("packages.ini"), "[cache]\nversion = 4\n");
    System.err.println("relais-reference: " + written.size() + " R4 definitions written to " + core);
  }

  // --- validation ---------------------------------------------------------------------------------

  private static void validate(Path in, Path out, int warmRounds) throws Exception {
    long started = System.nanoTime();
    ValidationEngine engine = new ValidationEngine.ValidationEngineBuilder()
        .withVersion("4.0.1").withUserAgent("relais-reference").withNoTerminologyServer()
        .fromSource("hl7.fhir.r4.core#4.0.1");
    engine.setTerminologyServer(null, null, FhirPublication.R4, false);
    // No resource fetcher: canonicals the package does not hold (TDDUI, FR Core) stay unknown instead of
    // being looked up on the network; references are not followed.
    engine.prepare();
    System.err.printf("relais-reference: engine ready in %d ms%n", (System.nanoTime() - started) / 1_000_000);
    List<Path> files;
    try (Stream<Path> s = Files.list(in)) {
      files = s.filter(p -> p.toString().endsWith(".json")).sorted().collect(Collectors.toList());
    }
    List<byte[]> sources = new ArrayList<>();
    for (Path f : files) sources.add(Files.readAllBytes(f));
    // One InstanceValidator for the whole run: ValidationEngine.validate() builds a new one per call (and
    // reloads its OID table) and renders an OperationOutcome narrative, which costs more than validating.
    InstanceValidator validator = engine.getValidator(FhirFormat.JSON);
    for (int round = 0; round < warmRounds; round++) {
      for (byte[] src : sources) validator.validate(null, new ArrayList<>(), new ByteArrayInputStream(src), FhirFormat.JSON);
    }
    try (Writer w = Files.newBufferedWriter(out, StandardCharsets.UTF_8)) {
      for (int k = 0; k < files.size(); k++) {
        List<ValidationMessage> messages = new ArrayList<>();
        long t0 = System.nanoTime();
        try {
          validator.validate(null, messages, new ByteArrayInputStream(sources.get(k)), FhirFormat.JSON);
        } catch (Exception e) {  // a Bundle the engine cannot read at all: one fatal message, as the CLI does
          messages.add(new ValidationMessage(ValidationMessage.Source.InstanceValidator, ValidationMessage.IssueType.STRUCTURE,
              "Bundle", String.valueOf(e.getMessage()), ValidationMessage.IssueSeverity.FATAL));
        }
        double ms = (System.nanoTime() - t0) / 1e6;
        StringBuilder line = new StringBuilder("{\"file\":").append(quote(files.get(k).getFileName().toString()))
            .append(",\"ms\":").append(String.format(Locale.ROOT, "%.3f", ms)).append(",\"messages\":[");
        for (int m = 0; m < messages.size(); m++) {
          ValidationMessage v = messages.get(m);
          if (m > 0) line.append(',');
          line.append("{\"level\":").append(quote(v.getLevel() == null ? "" : v.getLevel().toCode()))
              .append(",\"id\":").append(quote(v.getMessageId()))
              .append(",\"location\":").append(quote(v.getLocation()))
              .append(",\"text\":").append(quote(v.getMessage())).append('}');
        }
        w.write(line.append("]}\n").toString());
      }
    }
    System.err.printf("relais-reference: %d files in %d ms%n", files.size(), (System.nanoTime() - started) / 1_000_000);
  }

  private static String quote(String s) {
    if (s == null) return "null";
    StringBuilder b = new StringBuilder("\"");
    for (char c : s.toCharArray()) {
      if (c == '"' || c == '\\') b.append('\\').append(c);
      else if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
      else b.append(c);
    }
    return b.append('"').toString();
  }
}
