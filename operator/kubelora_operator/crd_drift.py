"""Whether the installed LoRATrainingJob CRD declares the spec fields this operator reads.

Helm installs the CRD from crds/ once and never upgrades it, so after `helm upgrade` without
`kubectl apply -f charts/kubelora/crds/` the API server keeps serving the older schema and prunes
every field it does not declare, silently for any client that does not ask for strict field
validation (kubectl does; the Python and Go clients, and server-side apply by some controllers,
do not): the setting never reaches the operator. The operator compares the installed schema with
its own (kubelora_trainer.crd) at start and, while they differ, on each new job (at most once a
minute), and says so: a warning in its log and a Warning Event on each job it creates.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from kubelora_trainer.spec import GROUP, PLURAL, VERSION

log = logging.getLogger("kubelora_operator.crd_drift")
CRD_NAME = f"{PLURAL}.{GROUP}"
RECHECK_SECONDS = 60.0


def fields(schema: dict, prefix: str = "spec") -> set[str]:
    """Every declared property path under schema (`spec.dataset.sources[].uri`). Pure."""
    out: set[str] = set()
    for name, prop in (schema.get("properties") or {}).items():
        path = f"{prefix}.{name}"
        out.add(path)
        out |= fields(prop, path)
        if isinstance(prop.get("items"), dict):
            out |= fields(prop["items"], f"{path}[]")
    return out


def spec_of(crd: dict) -> Optional[dict]:
    """The spec schema of the served version VERSION of a CRD object (a dict as the API returns it)."""
    for v in (crd.get("spec") or {}).get("versions") or []:
        if v.get("name") == VERSION:
            return (((v.get("schema") or {}).get("openAPIV3Schema") or {}).get("properties") or {}).get("spec")
    return None


def drift(installed: Optional[dict], wanted: dict) -> Optional[str]:
    """What a user must know when the installed spec schema is not this operator's, or None. Pure."""
    if installed is None:
        return (f"the installed {CRD_NAME} CRD does not serve {VERSION}, which this operator reads: apply the "
                "chart's CRD (kubectl apply -f charts/kubelora/crds/)")
    have, want = fields(installed), fields(wanted)
    missing, extra = sorted(want - have), sorted(have - want)
    parts = []
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        parts.append(f"the installed {CRD_NAME} CRD is older than this operator: it lacks {shown}, which the "
                     "API server drops from every manifest without a word to most clients; apply the chart's CRD "
                     "(kubectl apply -f charts/kubelora/crds/, or helm show crds <chart> | kubectl apply -f -)")
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        parts.append(f"the installed {CRD_NAME} CRD is newer than this operator: it declares {shown}, which this "
                     "operator does not know (a job that sets them fails with InvalidSpec); upgrade the operator")
    return "; ".join(parts) or None


class Checker:
    """The drift of the installed CRD, read through `read()` (the CRD as a dict, None when it
    cannot be read) at most every RECHECK_SECONDS while there is drift or the read failed; once
    the schemas agree it stays so (an operator runs one release). Never raises."""

    def __init__(self, read: Callable[[], Optional[dict]], wanted: Callable[[], dict]):
        self._read, self._wanted = read, wanted
        self._at: Optional[float] = None
        self._problem: Optional[str] = None
        self._agreed = False

    def problem(self, now: Optional[float] = None) -> Optional[str]:
        now = time.monotonic() if now is None else now
        if self._agreed or (self._at is not None and now - self._at < RECHECK_SECONDS):
            return self._problem
        self._at = now
        try:
            crd = self._read()
        except Exception as e:  # noqa: BLE001 - a check, never a reason to fail a job
            log.warning("could not read the %s CRD to compare its schema: %s", CRD_NAME, e)
            return self._problem
        if crd is None:
            return self._problem
        found = drift(spec_of(crd), self._wanted())
        if found and found != self._problem:
            log.warning("%s", found)
        self._problem, self._agreed = found, found is None
        return found
