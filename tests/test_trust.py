"""Nothing loaded from storage runs code: a pickle payload planted in a training checkpoint's
``.metadata``, in one of its non-tensor values or in a model folder's ``weights.pt`` is refused
with one line naming the file, and the payload never runs (it would create a file)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch


class _Payload:
    """Unpickling this calls ``Path(marker).touch()``: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _checkpoint_of(trained) -> Path:
    return Path(trained["summary"]["checkpoint"])


def test_a_planted_metadata_payload_is_refused_and_never_runs(trained, tmp_path):
    from app.checkpoint import CheckpointError, load_full, load_sharded
    from app.train import consolidate

    ckpt = tmp_path / "ckpt"
    shutil.copytree(_checkpoint_of(trained), ckpt)
    assert set(consolidate(ckpt)) == set(consolidate(_checkpoint_of(trained)))  # reads fine
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker), protocol=4))
    # the payload works with a plain unpickler: this is what torch's own reader would run
    with open(ckpt / ".metadata", "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match=r"\.metadata: refused to load.*pathlib.*touch"):
        load_full(ckpt)  # the export path (consolidation on the driver)
    with pytest.raises(Exception, match=r"\.metadata: refused to load"):
        load_sharded({"model": {}}, ckpt)  # the resume path (every worker)
    assert not marker.exists()


def test_a_planted_weights_payload_or_a_damaged_file_fails_in_one_line(trained, tmp_path):
    from app.export import ModelError, load_exported

    model_dir = tmp_path / "model"
    shutil.copytree(trained["model_dir"], model_dir)
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(marker)}, model_dir / "weights.pt")
    with pytest.raises(ModelError, match=r"weights\.pt: refused to load") as e:
        load_exported(model_dir)
    assert "\n" not in str(e.value) and not marker.exists()
    good = (trained["model_dir"] / "weights.pt").read_bytes()
    (model_dir / "weights.pt").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ModelError, match=r"weights\.pt: refused to load.*damaged") as e:
        load_exported(model_dir)
    assert "\n" not in str(e.value)
