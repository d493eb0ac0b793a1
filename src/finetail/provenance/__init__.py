"""Lineage and audit: from a number in the report back to the bytes it came from.

Every training job leaves two records of itself, ``metrics.json`` in its output folder and an
MLflow run (both defined in :mod:`finetail.record`), and both name the job's inputs with
their sha256. This package follows those records:

- :func:`lineage` walks from one result (a ``metrics.json``, an MLflow run id or a report cell)
  to the run that made it, its inputs (and whether each file on disk still has the digest the
  run recorded), its parent runs (fine-tune -> pretrain) and, through the manifests' ``store``
  / ``path`` columns, down to the dataset folders' ``source.json`` (the generator's seed and
  settings, or the URL and checksum of each raw file); :func:`format_lineage` prints it.
- :func:`audit` re-hashes every file the tracking store names and says which are ``ok``,
  ``changed`` or ``missing``; :func:`audit_exit_code` turns that into a process exit status.

Recorded paths are relative to the directory Snakemake ran in (``results/<study>/...``);
they are resolved against the ``results_dir`` given, so a study folder that was moved or
copied elsewhere is audited in its new place. The store is read through
:class:`finetail.tracking.TrackingStore`, chosen by the same rule as ``finetail train``
(:func:`finetail.tracking.choose_tracking_uri`).

Modules: ``files`` (digests, path re-rooting, the study's records, the store),
``sources`` (dataset nodes), ``walk`` (the lineage walk) and ``audit``.
"""

from .audit import audit, audit_exit_code, format_audit
from .files import CHANGED, MISSING, OK
from .walk import format_lineage, lineage

__all__ = [
    "CHANGED",
    "MISSING",
    "OK",
    "audit",
    "audit_exit_code",
    "format_audit",
    "format_lineage",
    "lineage",
]
