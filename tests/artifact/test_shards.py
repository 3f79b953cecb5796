"""The streaming safetensors writer against safetensors' own reader."""

import json

import pytest
import torch
from safetensors.torch import load_file

from moefx.artifact.shards import PlannedTensor, planned, shard_groups, write_shards


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(7, generator=g, dtype=torch.float64),
        "c.scalar": torch.tensor(2.5),
        "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.mask": torch.tensor([True, False, True]),
        "f.empty": torch.zeros(0, 4),
        "g.view": torch.randn(4, 6, generator=g)[:, ::2],  # not contiguous
    }


def test_one_file_reads_back_equal(tmp_path):
    tensors = _tensors()
    files = write_shards([planned(n, t) for n, t in tensors.items()], tmp_path)
    assert [f.name for f in files] == ["model.safetensors"] and not (tmp_path / "model.safetensors.index.json").exists()
    back = load_file(files[0])
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_shards_and_index_follow_the_size_limit(tmp_path):
    tensors = {f"layer.{i}.w": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each
    plan = [planned(n, t) for n, t in tensors.items()]
    files = write_shards(plan, tmp_path, max_shard_bytes=100)
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 200
    back = {}
    for f in files:
        part = load_file(f)
        assert sum(t.nbytes for t in part.values()) <= 100
        back.update(part)
        assert all(index["weight_map"][n] == f.name for n in part)
    assert all(torch.equal(back[n], t) for n, t in tensors.items())


def test_a_tensor_larger_than_a_shard_gets_its_own_file():
    plan = [planned("small", torch.zeros(2)), planned("big", torch.zeros(100)), planned("tail", torch.zeros(2))]
    assert [[e.name for e in g] for g in shard_groups(plan, 64)] == [["small"], ["big"], ["tail"]]


def test_tensors_are_made_one_at_a_time_in_order(tmp_path):
    made = []

    def maker(i):
        def make():
            made.append(i)
            return torch.full((3,), float(i))
        return make

    plan = [PlannedTensor(f"t{i}", (3,), torch.float32, maker(i)) for i in range(4)]
    write_shards(plan, tmp_path)
    assert made == [0, 1, 2, 3]


def test_a_tensor_unlike_its_plan_is_refused(tmp_path):
    plan = [PlannedTensor("w", (2, 3), torch.float32, lambda: torch.zeros(3, 2))]
    with pytest.raises(ValueError, match=r"w: planned as torch.float32 \[2, 3\] but made"):
        write_shards(plan, tmp_path)
    with pytest.raises(ValueError, match="names a tensor twice"):
        write_shards([planned("w", torch.zeros(1)), planned("w", torch.zeros(1))], tmp_path)
