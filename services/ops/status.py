"""`relais status`: a person's view of one transfer's timeline (pure), and the exit code its state gives."""

from __future__ import annotations

from typing import Any

from services.tracker import logic

STATUS_EXIT = {logic.DELIVERED: 0, logic.REJECTED: 11, logic.DEAD_LETTERED: 12}
STATUS_EXIT_IN_FLIGHT = 10
STATUS_EXIT_HELP = """\
exit code of `relais status` (the transfer's state):
  0  delivered to every target     10  still in flight (accepted, validated, routed, delivering)
  11 rejected (invalid Bundle)     12 dead-lettered (an operator must replay or discard it)
"""


def status_exit_code(status: str) -> int:
    """0 delivered, 11 rejected, 12 dead-lettered, 10 anything still in flight."""
    return STATUS_EXIT.get(status, STATUS_EXIT_IN_FLIGHT)


def _issues(outcome: Any) -> list[str]:
    if not isinstance(outcome, dict):
        return []
    lines = []
    for issue in outcome.get("issue") or []:
        if not isinstance(issue, dict) or issue.get("severity") == "information":
            continue
        where = ", ".join(str(e) for e in issue.get("expression") or []) or "(no FHIRPath)"
        rule = next((str(e.get("valueString")) for e in issue.get("extension") or []
                     if isinstance(e, dict) and str(e.get("url", "")).endswith("/issue-rule")), None)
        lines.append(f"{issue.get('severity', 'error'):<8} {where}  {issue.get('diagnostics', '')}"
                     + (f"  [{rule}]" if rule else ""))
    return lines


def render_status(tl: dict[str, Any]) -> str:
    """The transfer's state, then per target: status, attempts, ids assigned, errors and warnings (FHIRPath)."""
    out = [f"transfer {tl['id']}: {tl['status']}",
           f"  producer {tl.get('producer') or '-'}, created {str(tl['created_at'])[:19].replace('T', ' ')} UTC, "
           f"last change after {tl.get('duration_ms', 0) / 1000:.1f} s"]
    steps = tl.get("steps") or []
    for step in steps:
        detail = step.get("detail") or {}
        if step["kind"] in ("rejected", "validated") and detail.get("outcome"):
            found = _issues(detail["outcome"])
            if found:
                out.append(f"  validation ({step['kind']}):")
                out += [f"    {line}" for line in found]
        if step["kind"] == "failed":
            out.append(f"  stage {step['stage']} could not handle it: {detail.get('reason', '')} "
                       "(a dead letter: relais dlq list)")
    for d in tl.get("deliveries") or []:
        http = f", last HTTP {d['last_http_status']}" if d.get("last_http_status") else ""
        out.append(f"  target {d['target']}: {d['status']}, {d['attempts']} attempt(s){http}")
        for full_url, location in (d.get("assigned") or {}).items():
            out.append(f"    id assigned: {full_url} -> {location}")
        last = next((s for s in reversed(steps) if s.get("target") == d["target"]
                     and (s.get("detail") or {}).get("reason")), None)
        if last is not None and d["status"] not in (logic.DELIVERED,):
            out.append(f"    last reason: {last['detail']['reason']}")
        out += [f"    {line}" for line in _issues(d.get("outcome"))]
    return "\n".join(out)
