"""Config validation: each bad value names its key and what is allowed."""

import math

import pytest

from moe_train.config import (
    Config,
    ConfigError,
    DataConfig,
    EngineConfig,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    MTPConfig,
    OptimConfig,
    ParallelConfig,
    RopeScalingConfig,
    TrainerConfig,
)
from moe_train.tools.hydra_config import compose_config


@pytest.mark.parametrize(
    "build,message",
    [
        (
            lambda: MoEConfig(num_experts=8, top_k=9),
            "model.moe.top_k=9 must be between 1 and model.moe.num_experts=8",
        ),
        (lambda: ModelConfig(dim=100, num_heads=8), "model.dim=100 must be divisible by model.num_heads=8"),
        (
            lambda: ModelConfig(num_heads=8, num_kv_heads=3),
            "model.num_heads=8 must be divisible by model.num_kv_heads=3",
        ),
        (lambda: ModelConfig(num_kv_heads=0), "model.num_kv_heads=0 must be > 0"),
        (lambda: ModelConfig(rope_theta=0.0), "model.rope_theta=0.0 must be > 0"),
        (lambda: OptimConfig(lr=-1e-3), "optim.lr=-0.001 must be a positive number"),
        (
            lambda: OptimConfig(schedule="step"),
            "optim.schedule='step' is not allowed; choose one of cosine, linear, wsd",
        ),
        (lambda: OptimConfig(decay_fraction=1.5), "optim.decay_fraction=1.5 must be in [0, 1]"),
        (
            lambda: MoEConfig(num_experts=8, aux_loss_scope="global"),
            "model.moe.aux_loss_scope='global' is not allowed; choose one of batch, sequence",
        ),
        (
            lambda: MoEConfig(num_experts=8, score_function="relu"),
            "model.moe.score_function='relu' is not allowed; choose one of softmax, sigmoid",
        ),
        (
            lambda: TrainerConfig(global_batch_size=10, micro_batch_size=4),
            "trainer.global_batch_size=10 must be divisible by trainer.micro_batch_size=4",
        ),
        (
            lambda: TrainerConfig(device="tpu"),
            "trainer.device='tpu' is not allowed; choose one of auto, cpu, cuda",
        ),
        (lambda: DataConfig(seq_len=0), "data.seq_len=0 must be > 0"),
        (
            lambda: Config(model=ModelConfig(max_seq_len=64), data=DataConfig(seq_len=128)),
            "data.seq_len=128 must be <= model.max_seq_len=64",
        ),
        (
            lambda: Config(model=ModelConfig(moe=MoEConfig(num_experts=8)), parallel=ParallelConfig(ep=3)),
            "model.moe.num_experts=8 must be divisible by parallel.ep=3",
        ),
        (
            lambda: Config(model=ModelConfig(moe=MoEConfig(num_experts=8)), parallel=ParallelConfig(ep=16)),
            "parallel.ep=16 is larger than model.moe.num_experts=8",
        ),
        (lambda: MoEConfig(num_experts=8, capacity_factor=0.0), "model.moe.capacity_factor=0.0 must be > 0"),
        (
            lambda: MoEConfig(num_experts=8, top_k=2, num_expert_groups=4, topk_groups=4),
            "model.moe.topk_groups=4 must be between 1 and model.moe.num_expert_groups - 1 (3), at most "
            "model.moe.top_k=2, and its groups must hold top_k experts (2 each); 0 turns group-limited "
            "routing off",
        ),
        (  # one group of 2 experts cannot hold a top-4
            lambda: MoEConfig(num_experts=8, top_k=4, num_expert_groups=4, topk_groups=1),
            "model.moe.topk_groups=1 must be between 1",
        ),
        (
            lambda: MLAConfig(kv_lora_rank=64, qk_rope_head_dim=7),
            "model.mla.qk_rope_head_dim=7 must be even and > 0",
        ),
        (lambda: MLAConfig(kv_lora_rank=-1), "model.mla.kv_lora_rank=-1 must be >= 0"),
        (lambda: MTPConfig(num_layers=-1), "model.mtp.num_layers=-1 must be >= 0"),
        (
            lambda: MTPConfig(num_layers=1, loss_coef=float("nan")),
            "model.mtp.loss_coef=nan must be a number >= 0",
        ),
        (
            lambda: Config(model=ModelConfig(mtp=MTPConfig(num_layers=4)), data=DataConfig(seq_len=4)),
            "data.seq_len=4 leaves no position for multi-token prediction depth 4 (model.mtp.num_layers "
            "must be below data.seq_len)",
        ),
        (
            lambda: RopeScalingConfig(type="dynamic"),
            "model.rope_scaling.type='dynamic' is not allowed; choose one of none, llama3, yarn",
        ),
        (
            lambda: RopeScalingConfig(type="yarn", beta_fast=1.0, beta_slow=32.0),
            "model.rope_scaling.beta_slow=32.0 and beta_fast=1.0 must be finite numbers with 0 < beta_slow "
            "< beta_fast",
        ),
        (
            lambda: RopeScalingConfig(type="yarn", beta_fast=float("inf")),
            "model.rope_scaling.beta_slow=1.0 and beta_fast=inf must be finite numbers",
        ),
        (
            lambda: RopeScalingConfig(type="yarn", factor=float("inf")),
            "model.rope_scaling.factor=inf must be a finite number >= 1",
        ),
        (
            lambda: RopeScalingConfig(type="yarn", mscale_all_dim=-1.0),
            "model.rope_scaling.mscale_all_dim=-1.0 must be a finite number >= 0",
        ),
        (
            lambda: RopeScalingConfig(type="llama3", low_freq_factor=4.0, high_freq_factor=1.0),
            "model.rope_scaling.low_freq_factor=4.0 must be > 0 and below",
        ),
        (lambda: MLAConfig(kv_lora_rank=64, v_head_dim=0), "model.mla.v_head_dim=0 must be > 0"),
        (lambda: MLAConfig(kv_lora_rank=64, q_lora_rank=-2), "model.mla.q_lora_rank=-2 must be >= 0"),
        (
            lambda: MoEConfig(num_experts=8, routed_scaling_factor=0.0),
            "model.moe.routed_scaling_factor=0.0 must be > 0",
        ),
        (
            lambda: MoEConfig(num_experts=8, bias_update_rate=-0.1),
            "model.moe.bias_update_rate=-0.1 must be >= 0",
        ),
        (lambda: ParallelConfig(dp_shard=0), "parallel.dp_shard=0 must be >= 1, or -1 for the whole world"),
        (lambda: ParallelConfig(reduce_dtype="fp16"), "parallel.reduce_dtype='fp16' is not allowed"),
        (lambda: ParallelConfig(timeout_minutes=math.inf), "parallel.timeout_minutes=inf must be a finite"),
        (
            lambda: Config(engine=EngineConfig(name="deepspeed"), parallel=ParallelConfig(dp_shard=2)),
            "parallel.dp_shard, parallel.reshard_after_forward and parallel.reduce_dtype set FSDP2, "
            "which is engine=native's",
        ),
        (
            lambda: EngineConfig(name="deepspeed", zero_stage=3),
            "engine.zero_stage=3: DeepSpeed does not support ZeRO stage 3 with MoE layers; use stage 1 or 2",
        ),
        (lambda: EngineConfig(name="deepspeed", zero_stage=4), "engine.zero_stage=4 is not a ZeRO stage"),
        (
            lambda: EngineConfig(name="deepspeed", zero_stage=0),
            "engine.zero_stage=0 shards nothing: use engine=native for that",
        ),
        (
            lambda: EngineConfig(zero_stage=2),
            "engine.zero_stage, engine.offload_optimizer and engine.deepspeed_config need engine=deepspeed",
        ),
        (lambda: EngineConfig(name="megatron"), "engine.name='megatron' is not allowed"),
        (lambda: TrainerConfig(out_dir=""), "trainer.out_dir is empty: name the run directory"),
        (lambda: TrainerConfig(out_dir="  "), "trainer.out_dir is empty"),
        (
            lambda: ModelConfig(
                num_layers=4, moe=MoEConfig(num_experts=8, first_k_dense=1, every_n_layers=8)
            ),
            "model.moe.every_n_layers=8 leaves no MoE layer among layers 1 to 3",
        ),
        (
            lambda: MoEConfig(num_experts=8, capacity_factor=math.inf),
            "model.moe.capacity_factor=inf must be a finite number > 0 (or null for dropless)",
        ),
        (lambda: OptimConfig(lr=math.inf), "optim.lr=inf must be a positive number (a finite one)"),
        (lambda: OptimConfig(beta2=math.nan), "optim.beta2=nan must be in [0, 1)"),
        (
            lambda: DataConfig(split="98,2,inf"),
            "data.split='98,2,inf' must be three finite weights >= 0, train,validation,test, with "
            "validation > 0",
        ),
    ],
)
def test_bad_values_name_the_key(build, message):
    with pytest.raises(ConfigError) as error:
        build()
    assert str(error.value).startswith(message)


INF, NAN = math.inf, math.nan


def bad(section, key: str, value, **others):
    """A case: `section` built with the field `key` names set to `value`, and `others`."""
    return pytest.param(section, key, value, others, id=f"{key}={value!r}")


def moe(key: str, value):
    return bad(MoEConfig, f"model.moe.{key}", value, num_experts=8)


@pytest.mark.parametrize(
    "section,key,value,others",
    [
        # model.moe: counts, sizes and coefficients (checked on a dense model too)
        bad(MoEConfig, "model.moe.num_experts", -1),
        bad(MoEConfig, "model.moe.num_experts", INF),
        moe("top_k", 0),
        moe("top_k", NAN),
        bad(MoEConfig, "model.moe.top_k", -1),  # dense: unused, still not a count
        moe("num_shared_experts", -1),
        moe("expert_hidden_dim", 0),
        moe("expert_hidden_dim", -INF),
        moe("first_k_dense", -1),
        moe("every_n_layers", 0),
        moe("num_expert_groups", 0),
        moe("num_expert_groups", NAN),
        moe("topk_groups", -1),
        moe("aux_loss_coef", -0.1),
        moe("aux_loss_coef", NAN),
        moe("aux_loss_coef", INF),
        bad(MoEConfig, "model.moe.aux_loss_coef", NAN),  # dense
        moe("device_aux_loss_coef", NAN),
        moe("device_aux_loss_coef", INF),
        moe("z_loss_coef", -1.0),
        moe("z_loss_coef", INF),
        moe("routed_scaling_factor", 0.0),
        moe("routed_scaling_factor", INF),
        moe("routed_scaling_factor", NAN),
        moe("capacity_factor", INF),
        moe("capacity_factor", -INF),
        moe("capacity_factor", NAN),
        moe("capacity_factor", -1.0),
        moe("bias_update_rate", INF),
        moe("bias_update_rate", NAN),
        # model.rope_scaling: with the type that uses a field, and with none (unused, still checked)
        bad(RopeScalingConfig, "model.rope_scaling.factor", NAN),
        bad(RopeScalingConfig, "model.rope_scaling.factor", 0.5, type="yarn"),
        bad(RopeScalingConfig, "model.rope_scaling.factor", INF, type="llama3"),
        bad(RopeScalingConfig, "model.rope_scaling.low_freq_factor", NAN, type="llama3"),
        bad(RopeScalingConfig, "model.rope_scaling.low_freq_factor", INF),
        bad(RopeScalingConfig, "model.rope_scaling.high_freq_factor", INF, type="llama3"),
        bad(RopeScalingConfig, "model.rope_scaling.high_freq_factor", 0.0),
        bad(RopeScalingConfig, "model.rope_scaling.beta_fast", NAN),
        bad(RopeScalingConfig, "model.rope_scaling.beta_slow", NAN, type="yarn"),
        bad(RopeScalingConfig, "model.rope_scaling.beta_slow", -1.0),
        bad(RopeScalingConfig, "model.rope_scaling.original_max_seq_len", 0, type="yarn"),
        bad(RopeScalingConfig, "model.rope_scaling.original_max_seq_len", -1),
        bad(RopeScalingConfig, "model.rope_scaling.mscale", NAN),
        bad(RopeScalingConfig, "model.rope_scaling.mscale_all_dim", INF, type="yarn"),
        # model.mla (checked when off too) and model.mtp
        bad(MLAConfig, "model.mla.kv_lora_rank", NAN),
        bad(MLAConfig, "model.mla.q_lora_rank", -1),
        bad(MLAConfig, "model.mla.qk_nope_head_dim", 0, kv_lora_rank=64),
        bad(MLAConfig, "model.mla.qk_rope_head_dim", NAN, kv_lora_rank=64),
        bad(MLAConfig, "model.mla.qk_rope_head_dim", 0),
        bad(MLAConfig, "model.mla.v_head_dim", -1, kv_lora_rank=64),
        bad(MTPConfig, "model.mtp.num_layers", INF),
        bad(MTPConfig, "model.mtp.loss_coef", INF, num_layers=1),
        bad(MTPConfig, "model.mtp.loss_coef", -0.5),
        # model
        bad(ModelConfig, "model.vocab_size", 0),
        bad(ModelConfig, "model.dim", 0),
        bad(ModelConfig, "model.num_layers", -1),
        bad(ModelConfig, "model.num_heads", 0),
        bad(ModelConfig, "model.num_kv_heads", -8),
        bad(ModelConfig, "model.ffn_hidden_dim", 0),
        bad(ModelConfig, "model.max_seq_len", -1),
        bad(ModelConfig, "model.rope_theta", INF),
        bad(ModelConfig, "model.rope_theta", NAN),
        bad(ModelConfig, "model.norm_eps", 0.0),
        bad(ModelConfig, "model.norm_eps", INF),
        bad(ModelConfig, "model.init_std", NAN),
        bad(ModelConfig, "model.init_std", -0.02),
        # data
        bad(DataConfig, "data.seq_len", 0),
        bad(DataConfig, "data.seq_len", INF),
        bad(DataConfig, "data.vocab_size", 256),
        bad(DataConfig, "data.vocab_size", NAN),
        bad(DataConfig, "data.split", "98,inf,0"),
        bad(DataConfig, "data.split", "98,nan,0"),  # nan not first: min() would have skipped it
        bad(DataConfig, "data.split", "98,2,-1"),
        bad(DataConfig, "data.weights", [INF], name="indexed", prefixes=["a"]),
        bad(DataConfig, "data.weights", [1.0, NAN], name="indexed", prefixes=["a", "b"]),
        bad(DataConfig, "data.weights", [0.0], name="indexed", prefixes=["a"]),
        # optim
        bad(OptimConfig, "optim.lr", INF),
        bad(OptimConfig, "optim.lr", NAN),
        bad(OptimConfig, "optim.lr", 0.0),
        bad(OptimConfig, "optim.min_lr_ratio", NAN),
        bad(OptimConfig, "optim.min_lr_ratio", -0.1),
        bad(OptimConfig, "optim.min_lr_ratio", INF),
        bad(OptimConfig, "optim.warmup_steps", -1),
        bad(OptimConfig, "optim.decay_fraction", NAN),
        bad(OptimConfig, "optim.weight_decay", INF),
        bad(OptimConfig, "optim.weight_decay", NAN),
        bad(OptimConfig, "optim.weight_decay", -0.1),
        bad(OptimConfig, "optim.beta1", NAN),
        bad(OptimConfig, "optim.beta1", 1.0),
        bad(OptimConfig, "optim.beta2", INF),
        bad(OptimConfig, "optim.beta2", -0.1),
        bad(OptimConfig, "optim.eps", 0.0),
        bad(OptimConfig, "optim.eps", INF),
        bad(OptimConfig, "optim.eps", NAN),
        bad(OptimConfig, "optim.grad_clip", INF),
        bad(OptimConfig, "optim.grad_clip", NAN),
        bad(OptimConfig, "optim.grad_clip", -1.0),
        # trainer
        bad(TrainerConfig, "trainer.max_steps", 0),
        bad(TrainerConfig, "trainer.max_steps", INF),
        bad(TrainerConfig, "trainer.global_batch_size", 0),
        bad(TrainerConfig, "trainer.micro_batch_size", 0),
        bad(TrainerConfig, "trainer.micro_batch_size", NAN),
        bad(TrainerConfig, "trainer.eval_batches", 0),
        bad(TrainerConfig, "trainer.log_every", 0),
        bad(TrainerConfig, "trainer.eval_every", -1),
        bad(TrainerConfig, "trainer.ckpt_every", -1),
        bad(TrainerConfig, "trainer.num_samples", -1),
        bad(TrainerConfig, "trainer.sample_tokens", -1),
        bad(TrainerConfig, "trainer.keep_last", 0),
        bad(TrainerConfig, "trainer.seed", -1),
        bad(TrainerConfig, "trainer.seed", NAN),
        bad(TrainerConfig, "trainer.exit_after_steps", 0),
        bad(TrainerConfig, "trainer.exit_after_minutes", INF),
        bad(TrainerConfig, "trainer.exit_after_minutes", NAN),
        bad(TrainerConfig, "trainer.exit_after_minutes", 0.0),
        bad(TrainerConfig, "trainer.exit_after_minutes", -1.0),
        # parallel and engine
        bad(ParallelConfig, "parallel.ep", 0),
        bad(ParallelConfig, "parallel.ep", NAN),
        bad(ParallelConfig, "parallel.dp_shard", INF),
        bad(ParallelConfig, "parallel.dp_shard", -2),
        bad(ParallelConfig, "parallel.timeout_minutes", NAN),
        bad(ParallelConfig, "parallel.timeout_minutes", 0.0),
        bad(ParallelConfig, "parallel.timeout_minutes", -INF),
        bad(EngineConfig, "engine.zero_stage", NAN, name="deepspeed"),
    ],
)
def test_numbers_out_of_range_name_the_key(section, key, value, others):
    """inf, -inf, nan, negative and zero, where not allowed: refused in one line naming key=value."""
    with pytest.raises(ConfigError) as error:
        section(**{key.rsplit(".", 1)[1]: value}, **others)
    message = str(error.value)
    assert f"{key}={value!r}" in message and "\n" not in message, message


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model=nope"], "model=nope is not a preset; available: dbrx, dbrx_tiny"),
        (["trainer.max_steps=abc"], "trainer.max_steps: Value 'abc'"),
        (["model.moe.top_k=3", "model=dense_tiny"], None),  # dense: top_k unused
        (["data=indexed", "data.prefixes=[web/web]"], None),  # its seq_len fits the default preset
        (["model=mixtral_tiny", "model.moe.top_k=9"], "model.moe.top_k=9 must be between"),
        (
            ["model=mixtral_tiny", "model.moe.num_expert_groups=3"],
            "model.moe.num_expert_groups=3 must be >= 1 and divide model.moe.num_experts=8",
        ),
        # a key Hydra's `+` adds past the schema's struct mode: a typo that would train another run
        (["+trainer.max_step=4"], "trainer.max_step: no such key in the schema"),
        (["++model.moe.foo=1"], "model.moe.foo: no such key in the schema"),
        (["trainer.seed=-1"], "trainer.seed=-1 must be between 0 and 2**32 - 1"),
        # Hydra's grammar reads inf, -inf, nan (any case) and 1e999 as floats, .inf as a string
        (["model.moe.capacity_factor=inf"], "model.moe.capacity_factor=inf must be a finite number > 0"),
        (["optim.lr=NaN"], "optim.lr=nan must be a positive number (a finite one)"),
        (["optim.grad_clip=1e999"], "optim.grad_clip=inf must be a finite number >= 0"),
        (["optim.eps=.inf"], "optim.eps: Value '.inf' of type 'str' could not be converted to Float"),
        (["trainer.max_steps=inf"], "trainer.max_steps: Value 'inf' of type 'float' could not be converted"),
        (["trainer.out_dir="], "trainer.out_dir is empty"),
        (
            ["model=mixtral_tiny", "parallel.ep=4", "model.moe.device_aux_loss_coef=0.05"],
            "model.moe.device_aux_loss_coef=0.05 balances groups of experts, but model.moe.num_expert_groups=1",
        ),
    ],
)
def test_composed_overrides(overrides, message):
    if message is None:
        compose_config(overrides)
        return
    with pytest.raises(ConfigError) as error:
        compose_config(overrides)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_every_preset_composes():
    from moe_train.tools.hydra_config import CONF_DIR

    for preset in sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")):
        assert compose_config([f"model={preset}"]).model.name == preset
    assert compose_config(["+experiment=ci"]).trainer.max_steps == 30


@pytest.mark.parametrize(
    "global_batch,micro,ranks,expected",
    [
        (8, None, 1, 8),  # the default: each rank's whole share, no accumulation
        (8, None, 2, 4),
        (8, None, 8, 1),
        (8, 2, 2, 2),  # given: kept (two micro-batches of 2 per rank)
        (8, None, 3, "trainer.global_batch_size=8 must be divisible by the 3 data-parallel ranks"),
        (8, 4, 4, "trainer.global_batch_size=8 must be divisible by trainer.micro_batch_size=4 x 4"),
    ],
)
def test_batch_layout(global_batch, micro, ranks, expected):
    from moe_train.train.trainer import batch_layout

    t = TrainerConfig(global_batch_size=global_batch, micro_batch_size=micro)
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected):
            batch_layout(t, ranks)
        return
    assert batch_layout(t, ranks).micro_batch_size == expected
    assert compose_config(["trainer.global_batch_size=8"]).trainer.micro_batch_size is None


def test_deepseekmoe_145b_balances_one_group_of_experts_per_device():
    for ep in (1, 8):
        moe = compose_config(["model=deepseekmoe_145b", f"parallel.ep={ep}"]).model.moe
        assert (moe.num_expert_groups, moe.device_aux_loss_coef, moe.aux_loss_coef) == (ep, 0.05, 0.003)


def test_latent_attention_sets_its_own_head_sizes():
    """With MLA the head sizes are model.mla's: dim need not split into heads, kv heads are unused."""
    config = ModelConfig(dim=100, num_heads=8, num_kv_heads=3, mla=MLAConfig(kv_lora_rank=16))
    assert config.attention_head_dims == (128 + 64, 128) and config.rope_dim == 64
    assert ModelConfig(dim=64, num_heads=4).attention_head_dims == (16, 16)


def test_out_dir_with_a_tilde_is_in_the_home_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compose_config(["trainer.out_dir='~/runs/x'"]).trainer.out_dir == str(tmp_path / "runs" / "x")
