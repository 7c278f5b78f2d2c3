"""Nothing loaded from storage runs code: a pickle payload planted in a training checkpoint's
``.metadata`` or in a model folder's ``weights.pt`` is refused with one line naming the file,
and the payload never runs (it would create a file). What is served is what was trained: a
changed byte in a sealed file of a model folder fails the load in one line."""

from __future__ import annotations

import hashlib
import json
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
    # whoever can write weights.pt can rewrite model.json's checksum too
    info = json.loads((model_dir / "model.json").read_text())
    info["sha256"]["weights.pt"] = hashlib.sha256(
        (model_dir / "weights.pt").read_bytes()).hexdigest()
    (model_dir / "model.json").write_text(json.dumps(info))
    with pytest.raises(ModelError, match=r"weights\.pt: refused to load") as e:
        load_exported(model_dir)
    assert "\n" not in str(e.value) and not marker.exists()
    good = (trained["model_dir"] / "weights.pt").read_bytes()
    (model_dir / "weights.pt").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ModelError, match=r"weights\.pt: sha256 .* differs") as e:
        load_exported(model_dir)
    assert "\n" not in str(e.value)


def test_a_changed_byte_in_the_weights_fails_the_load_in_one_line(trained, tmp_path):
    from app.export import ModelError, load_exported, read_model_json

    model_dir = tmp_path / "model"
    shutil.copytree(trained["model_dir"], model_dir)
    sealed = read_model_json(model_dir)["sha256"]
    assert {"weights.pt", "user_history.npz", "item_popularity.npy"} <= set(sealed)
    assert any(name.startswith("vocab/") for name in sealed)
    load_exported(model_dir)  # intact: loads
    data = bytearray((model_dir / "weights.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte inside a tensor
    (model_dir / "weights.pt").write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"weights\.pt: sha256 .* differs .* after export") as e:
        load_exported(model_dir)
    assert "\n" not in str(e.value)
    shutil.copy(trained["model_dir"] / "weights.pt", model_dir / "weights.pt")
    (model_dir / "vocab" / "items.parquet").write_bytes(b"")
    with pytest.raises(ModelError, match=r"items\.parquet: sha256"):
        load_exported(model_dir)
