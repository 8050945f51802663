"""A MoE layer's experts as stacked tensors (``mthl_ds.moe.experts``): DeepSpeed's per-expert state dict, banks of
experts that train or stay frozen, and the refusal of checkpoints from before the experts were stacked."""
import pytest
import torch

from mthl_ds.config import ConfigError, load_recipe
from mthl_ds.moe.experts import KEYS
from mthl_ds.moe.gate import PerDatasetGate, RoutingContext
from mthl_ds.moe.layer import MoEMlp


def layer(num_experts=6, seed=1):
    gate = PerDatasetGate(8, num_experts, ["a"], {"a": 2}, drop_tokens=False, context=RoutingContext(dataset="a"))
    moe = MoEMlp(8, 16, num_experts, gate)
    moe.init_weights(seed=seed)
    return moe


def test_the_state_dict_holds_each_expert_as_deepspeeds_experts_name_it():
    """Keys ``deepspeed_moe.experts.deepspeed_experts.{e}.fc1.weight`` ... (DeepSpeed writes one checkpoint file per
    expert from them), each its own compact copy; a fresh layer loads them back, and a missing expert is named."""
    a, b = layer(seed=1), layer(seed=2)
    state = a.state_dict()
    keys = [k for k in state if "experts" in k]
    assert keys == [f"deepspeed_moe.experts.deepspeed_experts.{e}.{key}" for e in range(6) for key in KEYS]
    for e in range(6):
        for key, tensor in zip(KEYS, a.mlps.expert(e)):
            saved = state[f"deepspeed_moe.experts.deepspeed_experts.{e}.{key}"]
            assert torch.equal(saved, tensor) and saved.untyped_storage().nbytes() == saved.numel() * 4
    assert not torch.equal(a.mlps.stacks()[0], b.mlps.stacks()[0])
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(a.mlps.stacks(), b.mlps.stacks()))
    del state["deepspeed_moe.experts.deepspeed_experts.5.fc2.bias"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*deepspeed_experts\.5\.fc2\.bias"):
        b.load_state_dict(state)


def test_banks_split_the_experts_that_train_from_the_frozen_ones_and_change_no_output():
    moe = layer()
    x = torch.randn(20, 8)
    before, stacks = moe.eval()(x), [t.detach().clone() for t in moe.mlps.stacks()]
    moe.mlps.split([4, 1])
    assert moe.mlps.ids == [[0, 2, 3, 5], [1, 4]] and moe.mlps.trainable() == [False, True, False, False, True, False]
    assert all(torch.equal(t, s) for t, s in zip(moe.mlps.stacks(), stacks))  # in expert order
    torch.testing.assert_close(moe(x), before, rtol=0, atol=0)
    tuned = moe.expert_parameters([1, 4])
    assert [n for n, _ in tuned] == [f"deepspeed_moe.experts.banks.1.{n}" for n in
                                     ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")]
    assert all(p.requires_grad for _, p in tuned) and all(p.segments == 2 for _, p in tuned)
    with pytest.raises(ValueError, match="not whole banks"):
        moe.expert_parameters([1])
    moe.train()(x).square().sum().backward()  # the frozen bank gets no gradient, the tuned one does
    assert moe.mlps.banks[0].fc1_weight.grad is None and moe.mlps.banks[1].fc1_weight.grad.any()
    fresh = layer(seed=9)
    fresh.load_state_dict(moe.state_dict())
    assert all(torch.equal(t, s) for t, s in zip(fresh.mlps.stacks(), stacks))


def test_a_rank_takes_its_share_of_the_experts_each_training_as_it_did():
    moe = layer()
    moe.mlps.split([3, 4])
    share = MoEMlp(8, 16, 6, moe.gate, ep_size=2).mlps  # 3 local experts, as rank 1 of 2 holds them
    share.take(moe.mlps, 3)
    assert share.trainable() == [True, True, False]
    assert all(torch.equal(t, s[3:]) for t, s in zip(share.stacks(), moe.mlps.stacks()))


def test_a_checkpoint_from_before_the_experts_were_stacked_is_refused(tmp_path):
    """ZeRO's flat optimizer states follow the parameters' layout: a run.json without it cannot resume."""
    from mthl_ds.artifacts.checkpoint import POINTER, check_resume, model_signature
    from mthl_ds.runfiles import write_run_record
    recipe = load_recipe("demo")
    folder = tmp_path / "step00000002"
    folder.mkdir()
    signature = model_signature(recipe)
    write_run_record(folder, {"step": 2, "signature": signature})
    (tmp_path / POINTER).write_text("step00000002\n")
    assert check_resume(tmp_path, recipe) == "step00000002"
    del signature["expert_tensors"]
    write_run_record(folder, {"step": 2, "signature": signature})
    with pytest.raises(ConfigError, match="expert_tensors: checkpoint has None, recipe has 'stacked per MoE layer'"):
        check_resume(tmp_path, recipe)
