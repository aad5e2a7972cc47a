"""The pretrained bundle a federation starts from: the distilled student (all parameters,
frozen tables included) plus, for simulation only, each virtual client's local data.

One file, written atomically by the server-side pipeline and read once per process by the
clients (simulated clients are Ray actors, so the bundle travels as a path, not an object).
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.data.dataset import IntArray
from shared.data.provenance import DataProvenance
from shared.errors import ModelFileError
from shared.io import write_bytes_atomic
from shared.models.student import StudentConfig, StudentModel, load_student_state
from shared.training.device import cpu_state

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "fedrec-bundle-1"


@dataclass(frozen=True)
class ClientData:
    """Local data of the virtual clients (client id = index): train sequence, valid, test."""

    train: list[IntArray]
    valid: IntArray
    test: IntArray
    full: list[IntArray]

    def __len__(self) -> int:
        return len(self.train)


@dataclass(frozen=True)
class Bundle:
    """A student plus (optionally) the simulated clients' data."""

    student: StudentModel
    clients: ClientData | None
    n_items: int
    item_ids: list[str]
    trained_on: DataProvenance | None = None
    """The data and split the student was pretrained with (``None``: unknown, a bundle
    written before it was recorded); every model published from the bundle carries it."""


DEPLOY_BUNDLE = "deploy-bundle.pt"
"""The model-only bundle ``fedrec simulate`` writes next to ``bundle.pt`` for deployments."""


def save_bundle(
    path: str | Path,
    student: StudentModel,
    clients: ClientData | None,
    item_ids: list[str] | None = None,
    *,
    mode: int | None = None,
    trained_on: DataProvenance | None = None,
) -> None:
    """Write the bundle atomically; ``item_ids`` (the catalog, raw ids in column order) lets
    clients and the server publish artifacts pinned to this catalog. ``mode``: the file's
    permissions (default: its owner's only; a deployable bundle holds no user's data and
    containers running as another user read it). ``trained_on``: the data and split the
    student was pretrained with, which the models published from the bundle record."""
    payload: dict[str, object] = {
        "format": BUNDLE_FORMAT,
        "item_ids": list(item_ids)
        if item_ids is not None
        else [str(i) for i in range(student.n_items)],
        "student_config": asdict(student.config),
        "text_shape": list(student.items.text.weight.shape),
        "ids_shape": list(student.items.ids.weight.shape),
        "state_dict": cpu_state(student.state_dict()),  # loads where there is no GPU
    }
    if trained_on is not None:
        payload["trained_on"] = asdict(trained_on)
    if clients is not None:
        payload["clients"] = {
            "train": _pack(clients.train),
            "full": _pack(clients.full),
            "valid": torch.as_tensor(clients.valid),
            "test": torch.as_tensor(clients.test),
        }
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes_atomic(path, buf.getvalue(), mode=mode)


def check_deployable(bundle: Bundle, path: str | Path) -> None:
    """Refuse, for a deployment, a bundle that holds simulated clients' data: the server's
    bundle goes to every device, which would then hold every simulated user's history."""
    if bundle.clients is not None:
        raise ModelFileError(
            f"pretrained bundle {path} holds the simulated clients' data ({len(bundle.clients)} "
            "users' histories), and a deployment copies it to every device. Give the "
            f"model-only {DEPLOY_BUNDLE} that `fedrec simulate` writes next to it"
        )


def bundle_digest(path: str | Path) -> str:
    """SHA-256 (hex) of a bundle file: what the server sends so that nodes check theirs."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_bundle_digest(path: str | Path, expected: str) -> None:
    """Refuse a bundle whose SHA-256 is not ``expected`` (nothing to check when it is "")."""
    if not expected or not Path(path).is_file():
        return
    found = bundle_digest(path)
    if found != expected:
        raise ModelFileError(
            f"pretrained bundle {path} is not the server's (SHA-256 {found[:12]}... "
            f"against {expected[:12]}...): it would train and serve another model. Give this "
            f"node the same bundle file the server runs with (its {DEPLOY_BUNDLE} in a "
            "deployment)"
        )


def load_bundle(path: str | Path) -> Bundle:
    """Read a bundle, refusing anything that is not one (with what to do about it)."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(
            f"pretrained bundle {p} does not exist; run the pretraining stage "
            "(fedrec simulate does it and caches the result)"
        )
    if p.is_dir():
        raise ModelFileError(
            f"pretrained bundle {p} is a folder; give the file (runs/<name>/bundle.pt from "
            f"`fedrec simulate`, or its {DEPLOY_BUNDLE} for a deployment)"
        )
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        # torch's own text is a page that suggests weights_only=False (unsafe for a file of
        # unknown origin): keep its first line only
        said = str(err).strip()
        first = said.splitlines()[0] if said else ""
        if "weights_only" in said or len(first) < 12:  # e.g. pickle's bare "101", an opcode
            first = f"{type(err).__name__}: not a torch archive this reader takes"
        raise ModelFileError(
            f"pretrained bundle {p} is not a readable {BUNDLE_FORMAT} file ({first[:200]}); "
            f"give one that `fedrec simulate` wrote (runs/<name>/bundle.pt; a deployment's "
            f"server and devices take its {DEPLOY_BUNDLE})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != BUNDLE_FORMAT:
        raise ModelFileError(f"{p} is not a {BUNDLE_FORMAT} file")
    try:
        return _parse(payload, p)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        # a field missing, renamed or of another type: another fedrec version wrote it
        what = f"no {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
        raise ModelFileError(
            f"bundle {p} does not have the layout this fedrec reads ({what}); it was written "
            "by another version: write a new one with `fedrec simulate`"
        ) from None


def _parse(payload: dict[str, Any], p: Path) -> Bundle:
    config = StudentConfig(**payload["student_config"])
    text = np.zeros(payload["text_shape"], dtype=np.float32)
    ids = np.zeros(payload["ids_shape"], dtype=np.float32)
    student = StudentModel(text, ids, config)
    try:
        if not load_student_state(student, payload["state_dict"]):
            log.warning(
                "bundle %s predates the cold-start user vector: a device with no history "
                "scores from a zero user vector; write a new bundle with `fedrec simulate`",
                p,
            )
    except RuntimeError as err:
        raise ModelFileError(f"bundle {p} does not match the student architecture: {err}") from None
    # NaN or inf weights (a diverged pretraining, a damaged file) loaded: every client then
    # failed every round, a frozen table's after training and charging its privacy ledger
    broken = [
        name
        for name, tensor in student.state_dict().items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if broken:
        raise ModelFileError(
            f"bundle {p} holds NaN or inf weights ({', '.join(broken[:3])}"
            f"{', ...' if len(broken) > 3 else ''}): no client could train or evaluate it; "
            "pretrain again (`fedrec simulate`) and check its training loss"
        )
    student.eval()
    clients = None
    if "clients" in payload:
        c = payload["clients"]
        clients = ClientData(
            train=_unpack(c["train"], p),
            full=_unpack(c["full"], p),
            valid=c["valid"].numpy().astype(np.int64),
            test=c["test"].numpy().astype(np.int64),
        )
        counts = (len(clients.train), len(clients.full), len(clients.valid), len(clients.test))
        if len(set(counts)) != 1:  # client i is index i of each: one short fails client i
            raise ModelFileError(
                f"bundle {p} is damaged: its simulated clients' training sequences, full "
                f"histories, validation and test items number {', '.join(map(str, counts))}, "
                "one per client each; write it again with `fedrec simulate`"
            )
    item_ids = [str(i) for i in payload.get("item_ids", range(student.n_items))]
    recorded = payload.get("trained_on")  # absent in a bundle written before it was recorded
    trained_on = None if recorded is None else DataProvenance.from_mapping(recorded)
    return Bundle(
        student=student,
        clients=clients,
        n_items=student.n_items,
        item_ids=item_ids,
        trained_on=trained_on,
    )


def _pack(seqs: list[IntArray]) -> dict[str, torch.Tensor]:
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    flat = np.concatenate(seqs).astype(np.int64) if seqs else np.zeros(0, dtype=np.int64)
    return {"flat": torch.from_numpy(flat), "lengths": torch.from_numpy(lengths)}


def _unpack(packed: dict[str, torch.Tensor], p: Path) -> list[IntArray]:
    """Inverse of :func:`_pack`, refusing lengths that do not cut ``flat`` into pieces:
    sliced as they were, they dropped items or gave sequences of other clients' items."""
    flat = packed["flat"].numpy().astype(np.int64)
    lengths = packed["lengths"].numpy().astype(np.int64)
    if (lengths < 0).any() or int(lengths.sum()) != len(flat):
        raise ModelFileError(
            f"bundle {p} is damaged: its clients' sequence lengths (sum {int(lengths.sum())}) "
            f"do not cut its {len(flat)} items into sequences; write it again with "
            "`fedrec simulate`"
        )
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
