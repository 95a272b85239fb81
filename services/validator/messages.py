"""Diagnostics in plain language, English and French: one template per finding kind.

`say(lang, key, **values)` fills a template; unknown languages fall back to English. Templates end
with the fix, because the reader is a DUI vendor's developer who has to correct an export.
"""

from __future__ import annotations

from typing import Final

Lang = str  # "en" or "fr"

_T: Final[dict[str, tuple[str, str]]] = {
    # --- loading and base structure ---------------------------------------------------------------
    "json": (
        "The body is not valid JSON ({detail}); send the Bundle as UTF-8 JSON.",
        "Le corps n'est pas du JSON valide ({detail}) ; envoyez le Bundle en JSON UTF-8.",
    ),
    "not-object": (
        "The body is a JSON {kind}; send a FHIR Bundle, a JSON object whose resourceType is 'Bundle'.",
        "Le corps est un {kind} JSON ; envoyez un Bundle FHIR, un objet JSON dont le resourceType est "
        "'Bundle'.",
    ),
    "not-bundle": (
        "resourceType {found}; a TDDUI transfer is a FHIR Bundle of type 'transaction': set resourceType "
        "to 'Bundle'.",
        "resourceType {found} ; un transfert TDDUI est un Bundle FHIR de type 'transaction' : mettez "
        "resourceType à 'Bundle'.",
    ),
    "found-is": ("is {value}", "vaut {value}"),
    "found-missing": ("is missing", "est absent"),
    "structure": ("{path}: {msg}; {advice}.", "{path} : {msg} ; {advice}."),
    "resource-not-object": (
        "{at} is a JSON {kind}; an entry's resource must be a JSON object with a resourceType.",
        "{at} est un {kind} JSON ; la ressource d'une entrée doit être un objet JSON avec un resourceType.",
    ),
    "resource-type-missing": (
        "{at} has no resourceType; add the FHIR resource type (e.g. 'Patient').",
        "{at} n'a pas de resourceType ; ajoutez le type de ressource FHIR (par ex. 'Patient').",
    ),
    "resource-type-not-string": (
        "{at}.resourceType must be a string naming a FHIR resource type.",
        "{at}.resourceType doit être une chaîne nommant un type de ressource FHIR.",
    ),
    "resource-type-unknown": (
        "{rtype} is not a FHIR R4 resource type; use one of the types the TDDUI Bundle carries "
        "(Patient, Encounter, Task, ...).",
        "{rtype} n'est pas un type de ressource FHIR R4 ; utilisez un des types que porte le Bundle "
        "TDDUI (Patient, Encounter, Task, ...).",
    ),
    "nested-type-unknown": (
        "{path} is not a FHIR R4 resource type; a nested resource must name a concrete resource type.",
        "{path} n'est pas un type de ressource FHIR R4 ; une ressource imbriquée doit nommer un type "
        "de ressource concret.",
    ),
    "unreadable": (
        "{at} could not be read as FHIR R4; check its nested resources.",
        "{at} n'a pas pu être lu comme du FHIR R4 ; vérifiez ses ressources imbriquées.",
    ),
    # --- strict JSON and base R4 rules of the typed walk (r4.py) ----------------------------------
    "json-type": (
        "{at}: {value} is not a FHIR {ftype}: FHIR's JSON format needs {json} here, never a conversion "
        "(a string 'false' reads as true to many consumers); send {json}.",
        "{at} : {value} n'est pas un {ftype} FHIR : le format JSON de FHIR exige ici {json}, sans "
        "conversion (la chaîne 'false' vaut vrai pour bien des lecteurs) ; envoyez {json}.",
    ),
    "json-null": (
        "{at} is null; FHIR's JSON format never uses null (except to align a primitive array with its "
        "'_' extensions): leave the element out.",
        "{at} vaut null ; le format JSON de FHIR n'utilise jamais null (sauf pour aligner un tableau de "
        "primitives avec ses extensions '_') : omettez l'élément.",
    ),
    "ele-1": (
        "{at} is an empty object; every FHIR element must have a value or children (ele-1): fill it or "
        "leave it out.",
        "{at} est un objet vide ; tout élément FHIR doit avoir une valeur ou des enfants (ele-1) : "
        "remplissez-le ou omettez-le.",
    ),
    "ele-1-array": (
        "{at} is an empty array; FHIR's JSON format never sends [] (ele-1): leave the element out.",
        "{at} est un tableau vide ; le format JSON de FHIR n'envoie jamais [] (ele-1) : omettez l'élément.",
    ),
    "ele-1-empty": (
        "{at} is an empty string; a FHIR primitive has a value or extensions (ele-1): send the value or "
        "leave the element out.",
        "{at} est une chaîne vide ; une primitive FHIR a une valeur ou des extensions (ele-1) : envoyez la "
        "valeur ou omettez l'élément.",
    ),
    "code-unknown": (
        "{at}: {code} is not a code of {what} ({system}), a closed code system FHIR R4 binds here; use a "
        "code of that system.",
        "{at} : {code} n'est pas un code de {what} ({system}), système de codes fermé que FHIR R4 impose "
        "ici ; utilisez un code de ce système.",
    ),
    # --- Bundle transaction rules -----------------------------------------------------------------
    "bundle-type": (
        "Bundle.type is {value}; a TDDUI transfer must be a Bundle of type 'transaction': set type to "
        "'transaction'.",
        "Bundle.type vaut {value} ; un transfert TDDUI doit être un Bundle de type 'transaction' : mettez "
        "type à 'transaction'.",
    ),
    "entry-resource": (
        "{at} has no resource; every TDDUI entry carries the resource to create.",
        "{at} n'a pas de resource ; chaque entrée TDDUI porte la ressource à créer.",
    ),
    "entry-request": (
        "{at} has no request; add request with method 'POST' and url set to the resource type.",
        "{at} n'a pas de request ; ajoutez request avec method 'POST' et url égale au type de ressource.",
    ),
    "request-method": (
        "request.method is {value}; TDDUI only creates resources: use 'POST'.",
        "request.method vaut {value} ; TDDUI ne fait que créer des ressources : utilisez 'POST'.",
    ),
    "request-url": (
        "request.url {url} {what}; a create must POST to {rtype} — Relais repairs this before delivery.",
        "request.url {url} {what} ; une création doit faire un POST sur {rtype} — Relais le corrige "
        "avant la livraison.",
    ),
    "url-other-type": ("names another resource type", "nomme un autre type de ressource"),
    "url-not-type": ("is not a resource type", "n'est pas un type de ressource"),
    "fullurl-unique": (
        "fullUrl {url} is also the fullUrl of Bundle.entry[{other}], with the same meta.versionId; give every "
        "entry its own fullUrl (e.g. a fresh urn:uuid).",
        "fullUrl {url} est aussi le fullUrl de Bundle.entry[{other}], avec le même meta.versionId ; donnez à "
        "chaque entrée son propre fullUrl (par ex. un nouvel urn:uuid).",
    ),
    "fullurl-format": (
        "{at}: {url} is not a well-formed urn; a fullUrl urn is {kind}: correct it (and the references "
        "that use it).",
        "{at} : {url} n'est pas une urn bien formée ; une urn de fullUrl est {kind} : corrigez-la (et les "
        "références qui l'utilisent).",
    ),
    "fullurl-absolute": (
        "{at}: {url} is relative; FHIR R4 needs an absolute fullUrl (urn:uuid:, or the RESTful URL of the "
        "resource): send 'urn:uuid:' and a UUID.",
        "{at} : {url} est relative ; FHIR R4 exige une fullUrl absolue (urn:uuid:, ou l'URL RESTful de la "
        "ressource) : envoyez 'urn:uuid:' et un UUID.",
    ),
    "fullurl-resource": (
        "{at}: the RESTful fullUrl {url} does not name this resource ({rtype}, id {rid}); FHIR R4 requires "
        "it to end with the resource's type and id: correct the fullUrl or the resource id.",
        "{at} : la fullUrl RESTful {url} ne désigne pas cette ressource ({rtype}, id {rid}) ; FHIR R4 exige "
        "qu'elle finisse par le type et l'id de la ressource : corrigez la fullUrl ou l'id.",
    ),
    "ref-urn": (
        "{at} is {ref}, the fullUrl of no entry in this Bundle; add the referenced resource to the Bundle "
        "or correct the reference.",
        "{at} vaut {ref}, qui n'est le fullUrl d'aucune entrée de ce Bundle ; ajoutez la ressource "
        "référencée au Bundle ou corrigez la référence.",
    ),
    "ref-relative": (
        "{at} is {ref}, which names no entry of this Bundle; it resolves only if the receiving system "
        "already holds that resource. Add it to the Bundle if it belongs to this transfer.",
        "{at} vaut {ref}, qui ne désigne aucune entrée de ce Bundle ; la référence ne se résout que si le "
        "système destinataire détient déjà cette ressource. Ajoutez-la au Bundle si elle fait partie de "
        "ce transfert.",
    ),
    "ref-portable": (
        "{at} is {ref}: entries of this Bundle refer to each other by absolute fullUrl or 'Type/id', which "
        "FHIR servers resolve differently in a transaction. Relais rewrites such references to urn:uuid: "
        "fullUrls before delivery; better, give every entry a urn:uuid: fullUrl and refer to that.",
        "{at} vaut {ref} : les entrées de ce Bundle se référencent par fullUrl absolu ou 'Type/id', que les "
        "serveurs FHIR résolvent différemment dans une transaction. Relais réécrit ces références en "
        "fullUrl urn:uuid: avant la livraison ; mieux : donnez à chaque entrée un fullUrl urn:uuid: et "
        "référencez-le.",
    ),
    "ref-absolute": (
        "{at} is {ref}, an absolute URL that is the fullUrl of no entry; it resolves only if that server "
        "holds the resource. Use the entry's fullUrl if it is in this Bundle.",
        "{at} vaut {ref}, une URL absolue qui n'est le fullUrl d'aucune entrée ; elle ne se résout que si "
        "ce serveur détient la ressource. Utilisez le fullUrl de l'entrée si elle est dans ce Bundle.",
    ),
    "ref-format": (
        "{at} is {ref}, which is not a literal reference; use an entry's fullUrl (urn:uuid:...), a "
        "relative 'ResourceType/id' or an absolute URL.",
        "{at} vaut {ref}, qui n'est pas une référence littérale ; utilisez le fullUrl d'une entrée "
        "(urn:uuid:...), une référence relative 'TypeRessource/id' ou une URL absolue.",
    ),
    # --- profile rules ----------------------------------------------------------------------------
    "card-min": (
        "{at}: {element} is required at least {min} time(s) by {profile} but appears {count} time(s); "
        "add it.",
        "{at} : {profile} exige {element} au moins {min} fois mais il apparaît {count} fois ; "
        "ajoutez-le.",
    ),
    "card-max": (
        "{at}: {element} is allowed at most {max} time(s) by {profile} but appears {count} time(s); "
        "remove the extra ones.",
        "{at} : {profile} autorise {element} au plus {max} fois mais il apparaît {count} fois ; "
        "supprimez les occurrences en trop.",
    ),
    "slice-min": (
        "{at}: {profile} requires {min} {element} of slice '{slice}' ({what}) but found {count}; add it.",
        "{at} : {profile} exige {min} {element} de la tranche '{slice}' ({what}) mais en trouve "
        "{count} ; ajoutez-le.",
    ),
    "slice-min-unresolved": (
        "{at}: {profile} requires {min} {element} of slice '{slice}' ({what}); {count} found, and {unknown} "
        "more point(s) to resources that are not in the Bundle, so the slice cannot be checked (a warning, "
        "like the unresolved reference itself). Send the referenced resource in the Bundle.",
        "{at} : {profile} exige {min} {element} de la tranche '{slice}' ({what}) ; {count} trouvé(s), et "
        "{unknown} autre(s) pointe(nt) vers des ressources absentes du Bundle : la tranche ne peut être "
        "vérifiée (un avertissement, comme la référence non résolue elle-même). Envoyez la ressource "
        "référencée dans le Bundle.",
    ),
    "slice-max": (
        "{at}: {profile} allows at most {max} {element} of slice '{slice}' ({what}) but found {count}; "
        "keep only {max}.",
        "{at} : {profile} autorise au plus {max} {element} de la tranche '{slice}' ({what}) mais en "
        "trouve {count} ; n'en gardez que {max}.",
    ),
    "pattern": (
        "{at} is {value} but {profile} requires it to contain {expected}; correct it.",
        "{at} vaut {value} mais {profile} exige qu'il contienne {expected} ; corrigez-le.",
    ),
    "fixed": (
        "{at} is {value} but {profile} fixes it to {expected}; correct it.",
        "{at} vaut {value} mais {profile} le fixe à {expected} ; corrigez-le.",
    ),
    "fixed-defective": (
        "{at} is {value}; {profile} fixes it to the placeholder {expected}, which no real value can meet "
        "(IG defect, reported as a warning).",
        "{at} vaut {value} ; {profile} le fixe au texte provisoire {expected}, qu'aucune valeur réelle ne "
        "peut respecter (défaut du guide, signalé en avertissement).",
    ),
    "type": (
        "{at} is of type {found} but {profile} allows only {allowed} here; send the value as {allowed}.",
        "{at} est de type {found} mais {profile} n'autorise ici que {allowed} ; envoyez la valeur en "
        "{allowed}.",
    ),
    "binding-nocode": (
        "{at} has no coding, but {profile} requires a code from the value set {valueset} ({strength} "
        "binding); add a coding with system and code.",
        "{at} n'a pas de coding, mais {profile} exige un code du jeu de valeurs {valueset} (liaison "
        "{strength}) ; ajoutez un coding avec system et code.",
    ),
    "binding-notin": (
        "{at} is {value}, which is not in the value set {valueset} ({strength} binding in {profile}); "
        "use {allowed}.",
        "{at} vaut {value}, qui n'est pas dans le jeu de valeurs {valueset} (liaison {strength} dans "
        "{profile}) ; utilisez {allowed}.",
    ),
    "allowed-codes": ("one of {codes}", "l'un de {codes}"),
    "allowed-systems": ("a code of {systems}", "un code de {systems}"),
    "target-type": (
        "{at} points to a {found} but {profile} allows only {allowed} here; point it to the right "
        "resource.",
        "{at} pointe vers un {found} mais {profile} n'autorise ici que {allowed} ; faites-la pointer vers "
        "la bonne ressource.",
    ),
    "target-profile": (
        "{at} points to an entry conforming to {found} but {profile} requires {allowed}; point it to the "
        "right resource.",
        "{at} pointe vers une entrée conforme à {found} mais {profile} exige {allowed} ; faites-la "
        "pointer vers la bonne ressource.",
    ),
    "invariant": (
        "{at} breaks the invariant {key} of {profile}: {human}",
        "{at} ne respecte pas l'invariant {key} de {profile} : {human}",
    ),
    "invariant-error": (
        "{at}: the invariant {key} of {profile} could not be evaluated on this content ({detail}); "
        "check the element's shape.",
        "{at} : l'invariant {key} de {profile} n'a pas pu être évalué sur ce contenu ({detail}) ; "
        "vérifiez la forme de l'élément.",
    ),
    "ext-value-missing": (
        "{at}: the extension {ext} needs a value ({allowed}); add it.",
        "{at} : l'extension {ext} doit avoir une valeur ({allowed}) ; ajoutez-la.",
    ),
    "ext-value-forbidden": (
        "{at}: the extension {ext} is complex and carries no value[x]; put the data in its sub-extensions.",
        "{at} : l'extension {ext} est complexe et ne porte pas de value[x] ; mettez les données dans ses "
        "sous-extensions.",
    ),
    "ext-nested-forbidden": (
        "{at}: the extension {ext} is simple and may not contain extensions; remove them.",
        "{at} : l'extension {ext} est simple et ne peut pas contenir d'extensions ; supprimez-les.",
    ),
    "ext-unknown-sub": (
        "{at}: {url} is not a sub-extension of {ext}; use one of {known}.",
        "{at} : {url} n'est pas une sous-extension de {ext} ; utilisez l'une de {known}.",
    ),
    "ext-unknown": (
        "{at}: {url} is in the TDDUI namespace but the IG 2.4.0 defines no such extension; check its URL.",
        "{at} : {url} est dans l'espace de noms TDDUI mais le guide 2.4.0 ne définit pas cette extension ; "
        "vérifiez son URL.",
    ),
    # --- slices of the Bundle ---------------------------------------------------------------------
    "profile-unknown": (
        "{at} claims {url}, a TDDUI profile Relais does not know (IG {version}); the Bundle's slicing is open, "
        "so the entry is checked against base FHIR R4 only and fills no Bundle slice. Claim one of the "
        "{count} entry profiles if one was meant.",
        "{at} déclare {url}, un profil TDDUI que Relais ne connaît pas (guide {version}) ; le découpage du "
        "Bundle est ouvert, l'entrée n'est donc vérifiée que contre FHIR R4 et ne remplit aucune tranche. "
        "Déclarez l'un des {count} profils d'entrée si c'était l'intention.",
    ),
    "slice-not-filled": (
        "{at} claims {url}, a TDDUI profile that is no Bundle slice: the entry is checked against it but "
        "fills no Bundle slice (open slicing accepts it). Claim a slice profile if one was meant.",
        "{at} déclare {url}, un profil TDDUI qui n'est pas une tranche du Bundle : l'entrée est vérifiée "
        "contre lui mais ne remplit aucune tranche (le découpage ouvert l'accepte). Déclarez un profil de "
        "tranche si c'était l'intention.",
    ),
    "contained-patient": (
        "{at} is a contained Patient; TDDUI carries the usager as a Bundle entry of its own, under the "
        "identity rules of tddui-patient / tddui-patient-ins: make it an entry and reference it.",
        "{at} est un Patient contenu ; TDDUI porte l'usager dans une entrée du Bundle à part entière, soumise "
        "aux règles d'identité de tddui-patient / tddui-patient-ins : faites-en une entrée et référencez-la.",
    ),
    "profile-type": (
        "{at} claims {url}, a profile of {expected}, but the resource is a {rtype}; claim a profile of its "
        "type.",
        "{at} déclare {url}, un profil de {expected}, mais la ressource est un {rtype} ; déclarez un profil "
        "de son type.",
    ),
    "profile-version": (
        "{at} claims {url}; Relais checks the TDDUI {version} rules, which may differ from that version.",
        "{at} déclare {url} ; Relais vérifie les règles TDDUI {version}, qui peuvent différer de cette "
        "version.",
    ),
    "slice-none": (
        "{at}: this {rtype} matches none of the Bundle slices for its type ({slices}), so it fills no slice; "
        "the slicing is open, so it is accepted and checked against base FHIR R4 only. The closest, {best}, "
        "fails on {count} rule(s), first: {first} Fix them or claim the intended profile in meta.profile "
        "if a slice was meant.",
        "{at} : ce {rtype} ne correspond à aucune tranche du Bundle pour son type ({slices}) et n'en remplit "
        "donc aucune ; le découpage est ouvert, il est accepté et vérifié contre FHIR R4 seulement. La plus "
        "proche, {best}, échoue sur {count} règle(s), la première : {first} Corrigez-les ou déclarez le "
        "profil voulu dans meta.profile si une tranche était visée.",
    ),
    "slice-unprofiled": (
        "{at}: the TDDUI Bundle has no slice for {rtype}; open slicing tolerates it, but it is not checked "
        "against any TDDUI profile.",
        "{at} : le Bundle TDDUI n'a pas de tranche pour {rtype} ; le découpage ouvert le tolère, mais il "
        "n'est vérifié contre aucun profil TDDUI.",
    ),
    "slice-several": (
        "{at}: this {rtype} matches several Bundle slices ({slices}); claim the intended profile in "
        "meta.profile so receivers know which one it is.",
        "{at} : ce {rtype} correspond à plusieurs tranches du Bundle ({slices}) ; déclarez le profil voulu "
        "dans meta.profile pour que les destinataires sachent lequel c'est.",
    ),
}


def say(lang: Lang, template: str, **values: object) -> str:
    """The diagnostic `template` in `lang` (English when the language is not French), filled with `values`."""
    en, fr = _T[template]
    return (fr if lang == "fr" else en).format(**values)


def quote(value: object, limit: int = 80) -> str:
    """A producer-supplied value for a diagnostic, quoted and cut short."""
    text = value if isinstance(value, str) else _compact(value)
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _compact(value: object) -> str:
    import orjson

    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return str(value)


def json_kind(value: object, lang: Lang = "en") -> str:
    """The JSON kind of a decoded value ('object', 'array', ...), for diagnostics."""
    if value is None:
        kind = "null"
    elif isinstance(value, bool):
        kind = "boolean"
    elif isinstance(value, int | float):
        kind = "number"
    elif isinstance(value, str):
        kind = "string"
    elif isinstance(value, list):
        kind = "array"
    else:
        kind = "object" if isinstance(value, dict) else type(value).__name__
    if lang == "fr":
        return {"null": "null", "boolean": "booléen", "number": "nombre", "string": "chaîne",
                "array": "tableau", "object": "objet"}.get(kind, kind)
    return kind
