"""moefx.offload: offloaded outputs equal the fully resident model's, for batches and generation,
at every budget and storage; statistics add up; bad budgets and files are refused clearly."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import moefx
from moefx.artifact.format import ArtifactError
from moefx.layer.experts import GroupedExperts
from moefx.offloading.store import ExpertLayout, OffloadError, stacked_expert_tensors
from tests.artifact.saved_cases import convert_and_save
from tests.passes.models import CASES

VOCAB, EXPERTS = 128, 8


def _llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )
    return LlamaForCausalLM(config).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converted Llama (experts all different) and its moefx.save output."""
    torch.manual_seed(0)
    model = _llama()
    moefx.moefy(model, num_experts=EXPERTS, top_k=2, init="random", example_inputs=(_ids(),))
    out = tmp_path_factory.mktemp("offload") / "out"
    moefx.save(model, out)
    return model, out


def _expert_bytes(model) -> int:
    _, layer = next(moefx.moe_layers(model))
    return ExpertLayout.of(stacked_expert_tensors(layer.experts)).slot_bytes


def _offloaded(converted, storage: str, experts: int, prefetch: bool, device: str = "cpu"):
    model, out = converted
    budget = experts * _expert_bytes(model)
    if storage == "cpu":
        return moefx.offload(copy.deepcopy(model), device=device, budget_bytes=budget, prefetch=prefetch)
    with torch.device("meta"):
        dense = _llama()
    structure = moefx.load(out, dense, weights=False)  # nothing read: every tensor still on meta
    assert all(t.is_meta for t in structure.parameters())
    return moefx.offload(structure, device=device, budget_bytes=budget, storage="disk", path=out, prefetch=prefetch)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


BUDGETS = {"one_expert": 1, "half_the_experts": 3 * EXPERTS // 2, "all_experts": 3 * EXPERTS}


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "on_demand"])
@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_offloaded_batches_equal_the_resident_model(converted, storage, prefetch, budget):
    model = converted[0]
    offloaded = _offloaded(converted, storage, BUDGETS[budget], prefetch)
    with torch.no_grad():
        for seed in range(3):  # later batches find some experts resident, or prefetched
            ids = torch.randint(0, VOCAB, (2 + seed, 9), generator=torch.Generator().manual_seed(seed))
            assert _rel(offloaded(ids).logits, model(ids).logits) <= 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path (pinned staging, copy stream, events) needs a GPU")
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "on_demand"])
@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_offloaded_on_cuda_equals_the_resident_model_on_cpu(converted, storage, prefetch):
    model = converted[0]
    offloaded = _offloaded(converted, storage, 1, prefetch, device="cuda")  # one slot: every layer streams
    with torch.no_grad():
        for seed in range(3):
            ids = torch.randint(0, VOCAB, (2 + seed, 9), generator=torch.Generator().manual_seed(seed))
            got = offloaded(ids.cuda()).logits
            assert got.device.type == "cuda"
            assert _rel(got.cpu(), model(ids).logits) <= 1e-4  # fp32 (the Triton kernels use IEEE fp32 dots)
    assert moefx.offload_stats(offloaded).loads > 0


@pytest.mark.parametrize("budget", ["one_expert", "half_the_experts"])
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "on_demand"])
def test_offloaded_greedy_generation_equals_the_resident_model(converted, prefetch, budget):
    model = converted[0]
    offloaded = _offloaded(converted, "disk", BUDGETS[budget], prefetch)
    prompt = _ids()[:2, :5]
    options = dict(max_new_tokens=16, do_sample=False, use_cache=True, output_logits=True, return_dict_in_generate=True,
                   pad_token_id=0)
    want = model.generate(prompt, **options)
    got = offloaded.generate(prompt, **options)
    assert got.sequences.shape == (2, 5 + 16)
    assert torch.equal(got.sequences, want.sequences)
    for step_got, step_want in zip(got.logits, want.logits, strict=True):
        assert _rel(step_got, step_want) <= 1e-6


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("gpt2", "sequential", "albert_like")], ids=lambda c: c.name)
def test_offload_handles_biases_plain_mlps_and_shared_layers(tmp_path, case):
    model, args, kwargs, dense = convert_and_save(case, tmp_path / "out", init="random")
    offloaded = moefx.offload(moefx.load(tmp_path / "out", dense, weights=False), device="cpu",
                              budget_bytes=2 * _expert_bytes(model), storage="disk", path=tmp_path / "out")
    with torch.no_grad():
        want, got = model(*args, **kwargs), offloaded(*args, **kwargs)
    want, got = (r if isinstance(r, torch.Tensor) else r[0] for r in (want, got))
    assert _rel(got, want) <= 1e-6


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "on_demand"])
def test_statistics_add_up(converted, prefetch):
    offloaded = _offloaded(converted, "disk", 5, prefetch)
    layout = ExpertLayout.of(stacked_expert_tensors(next(moefx.moe_layers(converted[0]))[1].experts))
    requests = 0
    with torch.no_grad():
        for seed in range(4):
            offloaded(torch.randint(0, VOCAB, (1, 3), generator=torch.Generator().manual_seed(seed)))
            # independently: one request per layer and expert that computed tokens
            requests += sum(int((layer.stats().tokens_per_expert > 0).sum()) for _, layer in moefx.moe_layers(offloaded))
    stats = moefx.offload_stats(offloaded)
    assert stats.requests == requests
    assert stats.requests == stats.hits + stats.prefetch_hits + stats.misses
    assert stats.loads == stats.misses + stats.prefetch_loads  # every load is a miss's or a guess
    assert stats.bytes_moved == stats.loads * layout.nbytes
    assert 0 <= stats.prefetch_hits <= stats.prefetch_loads
    held = sum(slot.key is not None for slot in offloaded._moefx_offload.slots)
    assert stats.evictions == stats.loads - held  # a load into an occupied slot evicts
    assert stats.wait_seconds > 0
    assert stats.tokens == 4 * 3 and stats.bytes_per_token == stats.bytes_moved / 12  # four forwards of 3 tokens
    assert (stats.num_slots, stats.slot_bytes) == (5, layout.slot_bytes)
    if not prefetch:
        assert stats.prefetch_loads == 0 and stats.prefetch_hits == 0
    assert moefx.offload_stats(offloaded, reset=True) == stats
    assert moefx.offload_stats(offloaded).requests == 0


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "on_demand"])
def test_hits_are_experts_resident_before_the_layer_asked(converted, prefetch):
    """Reference: before each layer call, which experts sit in a slot (pre-hook), and after it, which
    experts the layer asked for (its own token counts): asked and not held is a miss, however early
    the load for it started (a load for the running layer is not a prefetch)."""
    offloaded = _offloaded(converted, "disk", 3 * EXPERTS // 4, prefetch)  # a quarter of the experts
    cache = offloaded._moefx_offload
    held, expected = {}, {"hits": 0, "prefetch_hits": 0, "misses": 0}

    def before(index):
        def hook(layer, args):
            held[index] = {slot.key: slot.prefetched for slot in cache.slots if slot.key is not None}
        return hook

    def after(index):
        def hook(layer, args, output):
            for e in layer.stats().tokens_per_expert.nonzero().flatten().tolist():
                was = held[index].get((index, e))
                expected["misses" if was is None else "prefetch_hits" if was else "hits"] += 1
        return hook

    for index, (_, layer) in enumerate(moefx.moe_layers(offloaded)):
        layer.register_forward_pre_hook(before(index))
        layer.register_forward_hook(after(index))
    prompt = _ids()[:2, :5]
    offloaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    stats = moefx.offload_stats(offloaded)
    assert {k: getattr(stats, k) for k in expected} == expected
    assert stats.misses > 0 and stats.loads == stats.misses + stats.prefetch_loads
    assert stats.hits < stats.requests  # the trial read hits == requests with 245 loads
    assert stats.tokens == 2 * 5 + 2 * 7  # the prompt, then one token per sequence for 7 more steps


def test_the_printed_statistics_show_everything_as_dict_has(converted):
    offloaded = _offloaded(converted, "disk", 3, prefetch=True)
    with torch.no_grad():
        offloaded(_ids())
    stats = moefx.offload_stats(offloaded)
    for name, value in stats.as_dict().items():
        assert f"{name}={value!r}" in repr(stats), (name, repr(stats))
        assert f"{name.replace('_', ' ')} " in str(stats), (name, str(stats))
        if isinstance(value, int):
            assert f"{name.replace('_', ' ')} {value:,}" in str(stats), (name, str(stats))
    assert {"hits", "prefetch_hits", "misses", "bytes_per_token", "wait_seconds", "num_slots", "slot_bytes"} <= set(
        stats.as_dict())


def test_a_budget_for_every_expert_loads_each_once(converted):
    offloaded = _offloaded(converted, "disk", 3 * EXPERTS, prefetch=False)
    with torch.no_grad():
        offloaded(_ids())
        first = moefx.offload_stats(offloaded, reset=True)
        offloaded(_ids())
    assert first.loads == first.requests and first.evictions == 0
    again = moefx.offload_stats(offloaded)
    assert again.loads == 0 and again.hits == again.requests > 0


def test_cpu_storage_keeps_the_models_expert_tensors_without_a_copy(converted):
    model = copy.deepcopy(converted[0])
    originals = [t.data_ptr() for _, layer in moefx.moe_layers(model) for t in stacked_expert_tensors(layer.experts).values()]
    offloaded = moefx.offload(model, device="cpu", budget_bytes=2 * _expert_bytes(model))
    store = offloaded._moefx_offload.store
    assert [t.data_ptr() for layer in store.layers for t in layer.values()] == originals


def test_a_budget_below_one_expert_is_refused(converted):
    model = copy.deepcopy(converted[0])
    need = _expert_bytes(model)
    with pytest.raises(ValueError, match=rf"budget_bytes={need - 1} is smaller than one expert .*>= {need}"):
        moefx.offload(model, device="cpu", budget_bytes=need - 1)
    assert all(isinstance(layer.experts, GroupedExperts) for _, layer in moefx.moe_layers(model))  # untouched


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(storage="tape"), r"storage='tape' is unknown"),
        (dict(storage="disk"), r"storage='disk' reads the experts from a file: pass path="),
        (dict(path="x"), r"path='x' is only read with storage='disk'"),
        (dict(budget_bytes=0), r"budget_bytes=0 must be a positive int"),
    ],
)
def test_bad_arguments_are_refused(converted, options, message):
    with pytest.raises(ValueError, match=message):
        moefx.offload(copy.deepcopy(converted[0]), **{"device": "cpu", "budget_bytes": 1 << 30, **options})


def test_a_model_without_moe_layers_is_refused():
    with pytest.raises(ValueError, match="no moefx MoE layers: convert it first"):
        moefx.offload(_llama(), device="cpu", budget_bytes=1 << 20)


def test_a_missing_weights_file_is_named(converted, tmp_path):
    with pytest.raises(OffloadError, match=rf"the weights file {tmp_path / 'nothing.safetensors'} does not exist"):
        moefx.offload(copy.deepcopy(converted[0]), device="cpu", budget_bytes=1 << 30, storage="disk",
                      path=tmp_path / "nothing.safetensors")


def test_a_missing_tensor_is_named(converted, tmp_path):
    from safetensors.torch import load_file, save_file

    model, out = converted
    tensors = load_file(out / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.out_proj"]
    save_file(tensors, tmp_path / "partial.safetensors")
    with pytest.raises(OffloadError, match=r"tensor 'model.layers.1.mlp.experts.out_proj' is missing from .*partial"):
        moefx.offload(copy.deepcopy(model), device="cpu", budget_bytes=1 << 30, storage="disk",
                      path=tmp_path / "partial.safetensors")


def test_a_truncated_file_is_named_with_its_tensor(converted, tmp_path):
    model, out = converted
    data = (out / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 1000])
    structure = copy.deepcopy(model)
    with pytest.raises(OffloadError, match=r"cut.safetensors is truncated: tensor '.*' ends at byte \d+ but the file has"):
        moefx.offload(structure, device="cpu", budget_bytes=1 << 30, storage="disk", path=tmp_path / "cut.safetensors")
    assert not hasattr(structure, "_moefx_offload")


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "on_demand"])
def test_a_file_truncated_while_in_use_fails_the_forward_naming_it(converted, tmp_path, prefetch):
    model, out = converted
    path = tmp_path / "model.safetensors"
    path.write_bytes((out / "model.safetensors").read_bytes())
    offloaded = moefx.offload(copy.deepcopy(model), device="cpu", budget_bytes=_expert_bytes(model), storage="disk",
                              path=path, prefetch=prefetch)
    with open(path, "r+b") as f:
        f.truncate(1 << 10)
    with pytest.raises(OffloadError, match=r"model.safetensors ends before the data of tensor '.*experts"), torch.no_grad():
        offloaded(_ids())


def test_offloaded_models_refuse_training_and_saving(converted, tmp_path):
    offloaded = _offloaded(converted, "cpu", 2, prefetch=False)
    assert not offloaded.training and not any(p.requires_grad for p in offloaded.parameters())
    _, layer = next(moefx.moe_layers(offloaded))
    with pytest.raises(RuntimeError, match="offloaded MoE layer is for inference"):
        layer(torch.randn(3, 32, requires_grad=True))
    with pytest.raises(ArtifactError, match="save the model before moefx.offload"):
        moefx.save(offloaded, tmp_path / "again")
    with pytest.raises(ValueError, match="offloaded already"):
        moefx.offload(offloaded, device="cpu", budget_bytes=1 << 30)


class _LayersRunBackwards(torch.nn.Module):
    """MoE layers that run in reverse module order."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(moefx.MoE(d_model=16, d_hidden=32, num_experts=4, top_k=2) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            x = x + layer(x)
        return x


def test_prefetch_loads_the_layer_that_runs_next_not_the_next_in_module_order():
    torch.manual_seed(0)
    model = _LayersRunBackwards().eval()
    offloaded = moefx.offload(copy.deepcopy(model), device="cpu", budget_bytes=4 * _expert_bytes(model))
    cache = offloaded._moefx_offload
    waiting = []  # (layer starting, layers of the experts loaded ahead and not asked for yet)
    for i, layer in enumerate(offloaded.layers):
        layer.register_forward_pre_hook(
            lambda module, args, i=i: waiting.append((i, {slot.key[0] for slot in cache.slots if slot.prefetched})))
    x = torch.randn(8, 16)
    with torch.no_grad():
        for _ in range(3):  # the first forward shows the order; the second still starts with a guess
            waiting.clear()
            got = offloaded(x)
        want = model(x)
    assert [i for i, _ in waiting] == [2, 1, 0]
    assert all(layers == {i} for i, layers in waiting), waiting
    assert _rel(got, want) <= 1e-6


def test_the_cache_shuts_down_on_its_own_loader_thread():
    """The last reference to a cache can be dropped by its loader thread's last job; the
    shutdown that follows runs there, and must neither join that thread nor skip closing files."""
    from concurrent.futures import ThreadPoolExecutor

    from moefx.offloading.cache import LOADER_THREAD_PREFIX, _shut_down

    class Store:
        closed = False

        def close(self) -> None:
            self.closed = True

    loader, store = ThreadPoolExecutor(1, thread_name_prefix=LOADER_THREAD_PREFIX), Store()
    loader.submit(_shut_down, loader, store).result(timeout=10)
    assert store.closed
