import pytest
import torch
from safetensors.torch import load_file

from sae.atomic import atomic_save_tensors, atomic_write, atomic_write_json


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"step": 1})

    def half_write(tmp):
        tmp.write_text('{"step": ')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_write)
    assert target.read_text().replace(" ", "").replace("\n", "") == '{"step":1}'
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_tensors_round_trip_from_non_contiguous_views(tmp_path):
    x = torch.arange(12.0).view(3, 4).t()  # non-contiguous
    atomic_save_tensors(tmp_path / "t.safetensors", {"x": x}, {"note": "n"})
    assert torch.equal(load_file(tmp_path / "t.safetensors")["x"], x)
