"""moefx.add_router_losses: the router losses in ``outputs.loss`` (what a Hugging Face Trainer
optimises), logged beside the loss, and a Trainer checkpoint that resumes (README, "Training with
Hugging Face Trainer")."""

import copy
import pickle

import pytest
import torch

import moefx

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

VOCAB, SEQ = 64, 16


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    return moefx.moefy(model, num_experts=4, top_k=2, example_inputs=(torch.randint(0, VOCAB, (2, SEQ)),))


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, rows: int = 40):
        self.ids = torch.randint(0, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _router_grads(model) -> list[torch.Tensor]:
    return [layer.router.weight.grad.clone() for _, layer in moefx.moe_layers(model)]


def test_router_losses_are_in_the_loss_and_reach_the_routers(tmp_path):
    plain = _model().train()
    model = moefx.add_router_losses(copy.deepcopy(plain))
    assert moefx.add_router_losses(model) is model
    assert len(model._forward_hooks) == 1  # a second call adds nothing
    rows = _Tokens()
    batch = {key: torch.stack([rows[0][key], rows[1][key]]) for key in ("input_ids", "labels")}

    out, ref = model(**batch), plain(**batch)
    router_loss = moefx.aux_loss(plain)
    assert router_loss.item() > 0
    torch.testing.assert_close(out.loss, ref.loss + router_loss)
    torch.testing.assert_close(out.router_loss, router_loss.detach())
    assert not out.router_loss.requires_grad
    # The loss Trainer optimises is this one.
    trainer = _trainer(tmp_path, model)
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), ref.loss + router_loss)

    # The gradient the router loss adds reaches every router: hooked minus plain = the router loss's own.
    out.loss.backward()
    ref.loss.backward()
    plain_grads = _router_grads(plain)
    routers = [layer.router.weight for _, layer in moefx.moe_layers(plain)]
    plain(**batch)
    own = torch.autograd.grad(moefx.aux_loss(plain), routers)
    assert len(own) == 2
    for hooked, without, alone in zip(_router_grads(model), plain_grads, own):
        assert alone.abs().sum() > 0
        torch.testing.assert_close(hooked - without, alone)

    # Eval mode and a forward without labels: the output is left as it is.
    model.eval()
    assert "router_loss" not in model(**batch)
    model.train()
    assert model(input_ids=batch["input_ids"]).loss is None
    # deepcopy and pickle keep the hook (a module-level function).
    assert len(pickle.loads(pickle.dumps(model))._forward_hooks) == 1


def _trainer(output_dir, model, **overrides) -> "transformers.Trainer":
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=10, logging_steps=5, save_steps=5, report_to=[], use_cpu=True,
        per_device_train_batch_size=2, learning_rate=1e-3, disable_tqdm=True, seed=0, data_seed=0, **overrides,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    return moefx.add_router_losses(trainer)


def _moe_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if ".mlp." in name}


def test_trainer_logs_router_loss_and_resumes(tmp_path):
    # Ten steps, checkpoints at 5 and 10.
    model = _model()
    start = _moe_weights(model)
    trainer = _trainer(tmp_path / "full", model)
    moefx.add_router_losses(trainer)  # a second call adds no second callback
    assert sum(type(c).__name__ == "RouterLossCallback" for c in trainer.callback_handler.callbacks) == 1
    trainer.train()
    assert trainer.state.global_step == 10
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [5, 10]
    for entry in logged:
        assert 0 < entry["router_loss"] < entry["loss"]
    full = _moe_weights(model)
    assert all(not torch.equal(full[name], start[name]) for name in full if name.endswith("router.weight"))

    # A fresh model and Trainer resumed from step 5's checkpoint end where the uninterrupted run did.
    resumed_model = _model()
    resumed = _trainer(tmp_path / "resumed", resumed_model)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-5"))
    assert resumed.state.global_step == 10
    assert [e["step"] for e in resumed.state.log_history if "router_loss" in e] == [5, 10]
    # Same data order, RNG states and optimizer state: on CPU the ten-step weights come out bit for bit.
    after = _moe_weights(resumed_model)
    for name, value in full.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)
