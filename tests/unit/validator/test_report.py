"""`relais validate PATH...`: exit codes 0/1/2, the readable report, JSON lines, directories, options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from services.cli import main
from services.core.outcome import RULE_EXTENSION_URL
from tests.fixtures.tddui import make_bundle


def write(path: Path, bundle: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bundle if isinstance(bundle, bytes) else orjson.dumps(bundle))
    return path


def broken() -> dict[str, Any]:
    bundle = make_bundle(3, seed=2)
    del bundle["entry"][2]["resource"]["serviceProvider"]  # Encounter séjour: serviceProvider 1..1
    return bundle


def json_lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines()]


def rules(line: dict[str, Any]) -> set[str]:
    return {e["valueString"] for i in line["outcome"]["issue"] for e in i.get("extension", ())
            if e["url"] == RULE_EXTENSION_URL}


def test_valid_file_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "ok.json", make_bundle(30, seed=1))
    assert main(["validate", str(path)]) == 0
    assert f"{path}: valid (0 error(s), 0 warning(s)/note(s))" in capsys.readouterr().out


def test_invalid_file_exits_1_and_says_where_and_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "bad.json", broken())
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}: INVALID (1 error(s)" in out
    assert "Bundle.entry[2].resource.serviceProvider" in out
    assert "[tddui-encounter-sejour/card/serviceProvider]" in out


def test_one_invalid_file_among_valid_ones_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok = write(tmp_path / "a.json", make_bundle(3))
    bad = write(tmp_path / "b.json", broken())
    assert main(["validate", str(ok), str(bad), "--format", "json"]) == 1
    lines = json_lines(capsys.readouterr().out)
    assert [(line["path"], line["valid"]) for line in lines] == [(str(ok), True), (str(bad), False)]


def test_json_lines_hold_path_valid_and_the_operation_outcome(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "bad.json", broken())
    assert main(["validate", "--format", "json", str(path)]) == 1
    (line,) = json_lines(capsys.readouterr().out)
    assert set(line) == {"path", "valid", "outcome"}
    assert line["path"] == str(path) and line["valid"] is False
    assert line["outcome"]["resourceType"] == "OperationOutcome"
    (issue,) = line["outcome"]["issue"]
    assert issue["severity"] == "error" and issue["code"] == "required"
    assert issue["expression"] == ["Bundle.entry[2].resource.serviceProvider"]
    assert rules(line) == {"tddui-encounter-sejour/card/serviceProvider"}


def test_directory_input_is_walked_recursively_in_a_stable_order(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "exports" / "b.json", make_bundle(3, seed=1))
    write(tmp_path / "exports" / "a.json", make_bundle(3, seed=2))
    write(tmp_path / "exports" / "sub" / "c.json", broken())
    write(tmp_path / "exports" / "notes.txt", b"not a bundle")
    assert main(["validate", "--format", "json", str(tmp_path / "exports")]) == 1
    lines = json_lines(capsys.readouterr().out)
    assert [Path(line["path"]).relative_to(tmp_path / "exports").as_posix() for line in lines] == [
        "a.json", "b.json", "sub/c.json"]
    assert [line["valid"] for line in lines] == [True, True, False]


def test_not_json_is_an_invalid_file_not_a_crash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "garbage.json", b"{not json")
    assert main(["validate", "--format", "json", str(path)]) == 1
    (line,) = json_lines(capsys.readouterr().out)
    assert rules(line) == {"fhir-json"}


@pytest.mark.parametrize("argv", [
    ["validate"],                                 # no path
    ["validate", "--format", "xml", "x.json"],    # unknown format
    ["validate", "--lang", "de", "x.json"],       # unknown language
])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_missing_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok = write(tmp_path / "ok.json", make_bundle(3))
    assert main(["validate", str(ok), str(tmp_path / "nope.json")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_directory_without_bundles_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["validate", str(tmp_path / "empty")]) == 2
    assert "no *.json files" in capsys.readouterr().err


def test_warnings_travel_but_do_not_invalidate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "published.json", make_bundle(5, published_style=True))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert ": valid (0 error(s), 6 warning(s)/note(s))" in out  # 5 request.url + 1 reference portability
    assert "[tddui-bundle-request-url]" in out and "[tddui-bundle-ref-portable]" in out


def test_warnings_as_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "published.json", make_bundle(5, published_style=True))
    assert main(["validate", "--warnings-as-errors", "--format", "json", str(path)]) == 1
    (line,) = json_lines(capsys.readouterr().out)
    assert {i["severity"] for i in line["outcome"]["issue"]} == {"error"}


def test_ignore_rule_is_repeatable_and_takes_prefixes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    published = write(tmp_path / "published.json", make_bundle(5, published_style=True))
    bad = write(tmp_path / "bad.json", broken())
    argv = ["validate", "--format", "json", "--ignore-rule", "tddui-bundle-request-url",
            "--ignore-rule", "tddui-bundle-ref-portable", "--ignore-rule", "tddui-encounter-sejour/",
            str(published), str(bad)]
    assert main(argv) == 0
    lines = json_lines(capsys.readouterr().out)
    assert all(line["valid"] for line in lines)
    assert all(rules(line) == set() for line in lines)


def test_french_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "bad.json", broken())
    assert main(["validate", "--lang", "fr", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}: INVALIDE (1 erreur(s), 0 avertissement(s)/note(s))" in out
    assert "exige serviceProvider au moins 1 fois" in out
