"""Model configuration: plain keyword-only dataclasses, validated when built (RoPE scaling, MLA, the MoE
layer, the model, PEFT adapters).

Error messages name the full config key (``model.moe.top_k``) because that is
what the user types in YAML or on the command line.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

from moeyard.errors import ConfigError, require

__all__ = ["ConfigError", "MLAConfig", "ModelConfig", "MoEConfig", "PEFTConfig", "RopeScalingConfig"]


@dataclass(kw_only=True)
class RopeScalingConfig:
    """How RoPE reaches beyond the context it was trained at (models/rope.py)."""

    kind: Literal["none", "yarn"] = "none"
    """none: plain RoPE; yarn: YaRN (DeepSeek-V3, Kimi-K2, GPT-OSS)."""
    factor: float = 1.0
    """The context is this many times the original."""
    original_max_seq_len: int = 4096
    """The context the model was first trained at."""
    beta_fast: float = 32.0
    """Frequencies turning more than this often in the original context are kept as they are..."""
    beta_slow: float = 1.0
    """...those turning less often than this are divided by `factor`; a linear ramp between."""
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    """YaRN's magnitude terms as the published configs give them; with mscale_all_dim, MLA multiplies its
    softmax scale by (0.1 * mscale_all_dim * ln(factor) + 1)^2."""
    attention_factor: Optional[float] = None
    """cos and sin are multiplied by this; null: derived from factor (and mscale / mscale_all_dim)."""
    truncate: bool = True
    """Round the ramp's ends to whole dims (GPT-OSS sets false)."""

    def __post_init__(self) -> None:
        require(self.kind == "none" or self.factor >= 1,
                f"model.rope_scaling.factor={self.factor} must be >= 1 (it extends the context)")
        require(self.original_max_seq_len >= 1, "model.rope_scaling.original_max_seq_len must be >= 1")
        require(self.beta_fast >= self.beta_slow > 0,  # equal: a step, not a ramp (Kimi-K2 sets both to 1)
                f"model.rope_scaling.beta_fast={self.beta_fast} must be >= beta_slow={self.beta_slow} > 0")


@dataclass(kw_only=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values from one compressed latent per token,
    a RoPE part shared across heads (model.attention: mla)."""

    q_lora_rank: Optional[int] = None
    """Queries through a rank-r bottleneck with its own RMSNorm; null: one full projection (V2-Lite)."""
    kv_lora_rank: int = 64
    """The compressed latent of keys and values, the size a KV cache holds per token (with the RoPE key)."""
    qk_nope_head_dim: int = 32
    """Per head, the query/key dims without position."""
    qk_rope_head_dim: int = 16
    """Per head, the rotated dims; the key's are shared by all heads."""
    v_head_dim: int = 32
    latent_norm_eps: float = 1e-6
    """eps of the latents' RMSNorms (DeepSeek-V3 uses 1e-6 there whatever its rms_norm_eps)."""

    def __post_init__(self) -> None:
        for key in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            require(getattr(self, key) >= 1, f"model.mla.{key}={getattr(self, key)} must be >= 1")
        require(self.q_lora_rank is None or self.q_lora_rank >= 1, "model.mla.q_lora_rank must be >= 1 or null")
        require(self.qk_rope_head_dim >= 2 and self.qk_rope_head_dim % 2 == 0,
                f"model.mla.qk_rope_head_dim={self.qk_rope_head_dim} must be even for RoPE")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(kw_only=True)
class SwitchSettings:
    """model.moe.switch: what only router=switch reads."""

    jitter: float = 0.0
    """Multiply the router input by U(1-jitter, 1+jitter) while training (Switch used 0.01)."""

    def __post_init__(self) -> None:
        require(0 <= self.jitter < 1, f"model.moe.switch.jitter={self.jitter} must be in [0, 1)")


@dataclass(kw_only=True)
class SigmoidBiasSettings:
    """model.moe.sigmoid_bias: what only router=sigmoid_bias reads (DeepSeek-V3)."""

    bias_update_rate: float = 1.0e-3
    """How far each expert's selection bias moves per step, against its load (sign rule)."""
    n_groups: int = 1
    """Experts form this many groups..."""
    topk_groups: int = 1
    """...and each token may only use experts of its best `topk_groups` groups (DeepSeek-V3: 8 and 4)."""

    def __post_init__(self) -> None:
        require(self.bias_update_rate >= 0, "model.moe.sigmoid_bias.bias_update_rate must be >= 0")
        require(self.n_groups >= 1, f"model.moe.sigmoid_bias.n_groups={self.n_groups} must be >= 1")
        require(1 <= self.topk_groups <= self.n_groups, f"model.moe.sigmoid_bias.topk_groups={self.topk_groups} "
                f"must be between 1 and n_groups={self.n_groups}")


@dataclass(kw_only=True)
class DenseToSparseSettings:
    """model.moe.dense_to_sparse: what only router=dense_to_sparse reads (EvoMoE's DTS gate)."""

    steps: int = 1000
    """Optimizer steps to go from all experts per token to top_k."""
    start_temperature: float = 2.0
    """Softmax temperature at the start (high: nearly uniform over experts)."""
    end_temperature: float = 1.0
    """Softmax temperature at the end of the schedule and after."""

    def __post_init__(self) -> None:
        require(self.steps >= 1, f"model.moe.dense_to_sparse.steps={self.steps} must be >= 1")
        require(self.start_temperature > 0 and self.end_temperature > 0,
                f"model.moe.dense_to_sparse.start_temperature={self.start_temperature} and end_temperature="
                f"{self.end_temperature} must be > 0")


@dataclass(kw_only=True)
class MoEConfig:
    LEGACY_KEYS: ClassVar[dict[str, tuple[str, str]]] = {
        "jitter": ("switch", "jitter"), "bias_update_rate": ("sigmoid_bias", "bias_update_rate"),
        "n_groups": ("sigmoid_bias", "n_groups"), "topk_groups": ("sigmoid_bias", "topk_groups"),
        "dts_steps": ("dense_to_sparse", "steps"), "dts_start_temperature": ("dense_to_sparse", "start_temperature"),
        "dts_end_temperature": ("dense_to_sparse", "end_temperature")}
    """Router settings that were flat keys of model.moe before they moved to their router's section: YAML files
    and checkpoints that name them are still read (upgrade_keys)."""

    num_experts: int = 8
    """Routed experts per MoE layer."""
    num_experts_per_layer: Optional[list[int]] = None
    """Routed experts of each MoE layer, in order, where they differ (a model pruned with an uneven budget,
    `moeyard prune --keep-per-layer`); null: num_experts in every MoE layer."""
    top_k: int = 2
    """Experts each token is sent to."""
    ffn_dim: int = 256
    """Hidden size of one routed expert's SwiGLU (independent of the dense FFN)."""
    router: Literal["topk_softmax", "switch", "expert_choice", "sigmoid_bias", "dense_to_sparse"] = "topk_softmax"
    """Routing rule (models/moe/routers.py): topk_softmax (Mixtral/GShard/Qwen), switch (top-1), expert_choice
    (experts pick tokens; non-causal), sigmoid_bias (DeepSeek-V3, aux-loss-free), dense_to_sparse (DTS)."""
    renormalize: bool = True
    """Rescale the k selected weights of a token to sum to one (top_k > 1 only; top-1 keeps its probability)."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss (1.0 means balanced); sigmoid_bias wants it small (1e-4) or 0."""
    balance_loss: Literal["batch", "sequence"] = "batch"
    """batch: Switch/GShard loss with the load of the global batch; sequence: the same per sequence, averaged."""
    switch: SwitchSettings = field(default_factory=SwitchSettings)
    sigmoid_bias: SigmoidBiasSettings = field(default_factory=SigmoidBiasSettings)
    dense_to_sparse: DenseToSparseSettings = field(default_factory=DenseToSparseSettings)
    max_nodes_per_token: Optional[int] = None
    """Node-limited routing (DeepSeek-V3): each token's experts come from at most this many of the
    `routing_nodes` expert blocks, the blocks with the largest sum of the token's best ceil(top_k / M)
    scores; every token-choice router. null: no limit."""
    routing_nodes: Optional[int] = None
    """Expert blocks node-limited routing counts as nodes: experts [i*E/N, (i+1)*E/N) form block i. null:
    the machines the ep group spans (parallel.ranks_per_node), resolved when the run starts. Fix it to keep
    routing the same on any layout; a block must not straddle machines (a multiple of the nodes ep spans)."""
    z_loss_coef: float = 0.001
    """Weight of the router z-loss, mean(logsumexp(logits)^2)."""
    capacity_factor: Optional[float] = None
    """None: dropless. Otherwise each expert takes at most
    ceil(capacity_factor * tokens * top_k / num_experts) copies of each rank's tokens; the rest are dropped
    (so which copies drop depends on how the batch is split over ranks). expert_choice: the tokens each
    expert takes from each sequence, ceil(capacity_factor * seq_len * top_k / num_experts); None means 1.0."""
    route_scale: float = 1.0
    """Multiplies every routed expert's weight (DeepSeek-V3's routed_scaling_factor, 2.5; Kimi-K2 2.827)."""
    router_bias: bool = False
    """A learned bias on the router's logits (GPT-OSS)."""
    expert_bias: bool = False
    """Biases on the routed experts' gate, up and down projections (GPT-OSS)."""
    activation: Literal["swiglu", "swiglu_clamped"] = "swiglu"
    """The routed experts' gated unit. swiglu: silu(gate) * up. swiglu_clamped (GPT-OSS): gate clamped
    above and up on both sides at swiglu_limit, then gate * sigmoid(swiglu_alpha * gate) * (up + 1)."""
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    num_shared_experts: int = 0
    """Always-on experts applied to every token (DeepSeek/Qwen style)."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output per token by sigmoid(a learned linear score) (Qwen2-MoE)."""
    shared_ffn_dim: Optional[int] = None
    """Hidden size of the fused shared expert; default ffn_dim * num_shared_experts."""
    every: int = 1
    """After the first dense layers, every `every`-th block is an MoE block."""
    first_dense_layers: int = 0
    """Leading blocks that use a dense FFN."""
    expert_compute: Literal["auto", "loop", "grouped_mm"] = "auto"
    """auto: a loop of matmuls on CPU, torch._grouped_mm on GPU."""
    skip_threshold: float = 0.0
    """Evaluation only (dynamic expert skipping): leave out a token's second (and later) expert when its
    routing weight is below this; the remaining weights are kept as they are. 0: never."""
    recompute_experts: bool = False
    """Activation checkpointing for the routed experts: keep only their input rows and recompute the
    MLPs in backward (about 2/9 more expert FLOPs, most of the MoE layer's activation memory saved)."""

    def __post_init__(self) -> None:
        for name, settings in (("switch", SwitchSettings), ("sigmoid_bias", SigmoidBiasSettings),
                               ("dense_to_sparse", DenseToSparseSettings)):
            if isinstance(getattr(self, name), dict):  # MoEConfig(**a_recorded_dict)
                setattr(self, name, settings(**getattr(self, name)))
        require(self.num_experts >= 1, f"model.moe.num_experts={self.num_experts} must be >= 1")
        require(1 <= self.top_k <= self.num_experts,
                f"model.moe.top_k={self.top_k} must be between 1 and model.moe.num_experts={self.num_experts}")
        require(self.ffn_dim >= 1, f"model.moe.ffn_dim={self.ffn_dim} must be >= 1")
        require(self.capacity_factor is None or self.capacity_factor > 0,
                f"model.moe.capacity_factor={self.capacity_factor} must be > 0, or null for dropless")
        require(self.num_shared_experts >= 0, "model.moe.num_shared_experts must be >= 0")
        require(not self.shared_expert_gate or self.num_shared_experts > 0,
                "model.moe.shared_expert_gate needs model.moe.num_shared_experts >= 1")
        require(self.every >= 1, f"model.moe.every={self.every} must be >= 1")
        require(self.first_dense_layers >= 0, "model.moe.first_dense_layers must be >= 0")
        require(self.router != "switch" or self.top_k == 1,
                f"model.moe.router=switch routes each token to one expert: set model.moe.top_k=1 (got {self.top_k})")
        require(self.switch.jitter == 0 or self.router == "switch",
                "model.moe.switch.jitter applies to router=switch only")
        groups = self.sigmoid_bias
        require(self.num_experts % groups.n_groups == 0, f"model.moe.sigmoid_bias.n_groups={groups.n_groups} must "
                f"divide model.moe.num_experts={self.num_experts}")
        require(groups.n_groups == 1 or self.router == "sigmoid_bias",
                "model.moe.sigmoid_bias.n_groups (group-limited routing) applies to router=sigmoid_bias only")
        require(self.top_k <= groups.topk_groups * (self.num_experts // groups.n_groups),
                f"model.moe.top_k={self.top_k} exceeds the experts of topk_groups={groups.topk_groups} groups")
        if self.max_nodes_per_token is not None:
            require(self.router != "expert_choice", "model.moe.max_nodes_per_token limits a token's choice: "
                    "router=expert_choice has experts choose tokens; unset max_nodes_per_token")
            require(self.max_nodes_per_token >= 1,
                    f"model.moe.max_nodes_per_token={self.max_nodes_per_token} must be >= 1, or null for no limit")
        if self.routing_nodes is not None:
            require(self.routing_nodes >= 1 and self.num_experts % self.routing_nodes == 0,
                    f"model.moe.routing_nodes={self.routing_nodes} must divide model.moe.num_experts="
                    f"{self.num_experts}")
            M = self.max_nodes_per_token
            require(M is None or self.top_k <= min(M, self.routing_nodes) * (self.num_experts // self.routing_nodes),
                    f"model.moe.top_k={self.top_k} exceeds the experts of max_nodes_per_token={M} of "
                    f"routing_nodes={self.routing_nodes} blocks: raise max_nodes_per_token")
            if M is not None and M < self.routing_nodes and groups.n_groups > 1:
                groups_per_node = groups.n_groups // self.routing_nodes
                require(groups.n_groups % self.routing_nodes == 0,
                        f"model.moe.sigmoid_bias.n_groups={groups.n_groups} must be a multiple of routing_nodes="
                        f"{self.routing_nodes} under max_nodes_per_token: each routing node must hold whole groups")
                require(groups.topk_groups <= M * groups_per_node,
                        f"model.moe.sigmoid_bias.topk_groups={groups.topk_groups} exceeds the {M * groups_per_node} "
                        f"groups of max_nodes_per_token={M} routing nodes")
        require(self.router != "expert_choice" or self.balance_loss == "batch",
                "model.moe.router=expert_choice is balanced by construction: balance_loss=sequence has no meaning")
        require(0 <= self.skip_threshold < 1, f"model.moe.skip_threshold={self.skip_threshold} must be in [0, 1)")
        require(self.skip_threshold == 0 or self.router != "expert_choice",
                "model.moe.skip_threshold skips a token's later choices: router=expert_choice has none")
        require(self.route_scale > 0, f"model.moe.route_scale={self.route_scale} must be > 0")
        require(self.aux_loss_coef >= 0 and self.z_loss_coef >= 0,
                "model.moe.aux_loss_coef and model.moe.z_loss_coef must be >= 0")

    @classmethod
    def upgrade_keys(cls, data: dict[str, Any], prefix: str) -> dict[str, Any]:
        """`data` (model.moe as written) with the LEGACY_KEYS moved into their router's section; the same
        setting given both ways, with two values, is refused."""
        if not any(key in data for key in cls.LEGACY_KEYS):
            return data
        data = {key: dict(value) if isinstance(value, dict) else value for key, value in data.items()}
        for old, (section, new) in cls.LEGACY_KEYS.items():
            if old not in data:
                continue
            value = data.pop(old)
            settings = data.setdefault(section, {})
            require(isinstance(settings, dict), f"{prefix}.{section} must be a mapping of keys, got {settings!r}")
            if settings.get(new, value) != value:
                raise ConfigError(f"{prefix}.{old}={value!r} and {prefix}.{section}.{new}={settings[new]!r} set the "
                                  f"same thing: keep {prefix}.{section}.{new}")
            settings[new] = value
        return data

    @property
    def shared_hidden_dim(self) -> int:
        return self.shared_ffn_dim or self.ffn_dim * self.num_shared_experts


@dataclass(kw_only=True)
class ModelConfig:
    vocab_size: int = 264
    """Embedding rows; the byte tokenizer needs 257 (256 bytes + end of text)."""
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    """Grouped-query attention: key/value heads shared by n_heads / n_kv_heads query heads."""
    head_dim: Optional[int] = None
    """Size of one attention head; null: dim / n_heads (Qwen3 sets it apart from dim)."""
    attention: Literal["gqa", "mla"] = "gqa"
    """gqa: grouped-query attention (n_kv_heads, head_dim); mla: multi-head latent attention (model.mla)."""
    mla: MLAConfig = field(default_factory=MLAConfig)
    """The latent attention's dims (attention: mla only)."""
    attn_bias: bool = False
    """Biases on the query, key and value projections (Qwen2)."""
    qk_norm: Literal["none", "head", "full"] = "none"
    """RMSNorm of queries and keys before RoPE: per head (Qwen3) or over all heads together (OLMoE)."""
    attn_out_bias: bool = False
    """A bias on the attention's output projection (GPT-OSS)."""
    attention_sinks: bool = False
    """A learned logit per head in every softmax's denominator (GPT-OSS)."""
    sliding_window: int = 0
    """Tokens a sliding-window layer sees (itself and sliding_window - 1 before); 0: none."""
    layer_types: Optional[list[Literal["sliding", "full"]]] = None
    """Per layer, sliding-window or full attention (GPT-OSS alternates, starting with sliding); None: every
    layer sliding when sliding_window is set."""
    ffn_dim: int = 512
    """Hidden size of the dense SwiGLU blocks."""
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    rope_fraction: float = 1.0
    """Share of each head's dims that RoPE rotates, the first ones (GLM-4.5: 0.5, partial_rotary_factor); the
    rest carry no position. attention: gqa only."""
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)
    mtp_layers: int = 0
    """DeepSeek-V3 multi-token prediction: D modules after the last block, the k-th predicting the token k+1
    places ahead; they share the embedding and the output layer. Trained only (forward(mtp=True)). 0: none."""
    mtp_loss_coef: float = 0.3
    """Weight in the training objective of mtp_loss, the mean of the D depths' losses (DeepSeek-V3: 0.3, then
    0.1 for its last 4.8T tokens)."""
    peft: "PEFTConfig" = field(default_factory=lambda: PEFTConfig())
    """Routed low-rank adapters on chosen linear maps (models/peft/adapters.py); method none: no adapters."""

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # ModelConfig(**a_recorded_dict) works as it did before peft existed
            self.moe = MoEConfig(**MoEConfig.upgrade_keys(self.moe, "model.moe"))
        if isinstance(self.peft, dict):
            self.peft = PEFTConfig(**self.peft)
        if isinstance(self.mla, dict):
            self.mla = MLAConfig(**self.mla)
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScalingConfig(**self.rope_scaling)
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            require(getattr(self, key) >= 1, f"model.{key}={getattr(self, key)} must be >= 1")
        if self.head_dim is None:
            require(self.dim % self.n_heads == 0,
                    f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}: set model.head_dim")
            self.head_dim = self.dim // self.n_heads
        require(self.attention == "gqa" or (self.qk_norm == "none" and not self.attn_bias),
                "model.attention=mla has its own norms (of the latents) and no q/k/v biases: set model.qk_norm=none "
                "and model.attn_bias=false")
        require(self.attention == "gqa" or not (self.attn_out_bias or self.attention_sinks or self.sliding_window),
                "model.attention=mla has no output bias, sinks or sliding window: unset attn_out_bias, "
                "attention_sinks and sliding_window")
        require(self.sliding_window >= 0, f"model.sliding_window={self.sliding_window} must be >= 0 (0: none)")
        if self.layer_types is not None:
            require(len(self.layer_types) == self.n_layers and set(self.layer_types) <= {"sliding", "full"},
                    f"model.layer_types={self.layer_types} must give 'sliding' or 'full' for each of the "
                    f"{self.n_layers} layers")
            require("sliding" not in self.layer_types or self.sliding_window > 0,
                    "model.layer_types has sliding layers: set model.sliding_window to their window")
        require(0 <= self.mtp_layers < self.max_seq_len - 1,
                f"model.mtp_layers={self.mtp_layers} must be >= 0 and below model.max_seq_len - 1")
        require(self.mtp_loss_coef >= 0, f"model.mtp_loss_coef={self.mtp_loss_coef} must be >= 0")
        require(0 < self.rope_fraction <= 1 and (self.attention == "gqa" or self.rope_fraction == 1),
                f"model.rope_fraction={self.rope_fraction} must be in (0, 1], and 1 with model.attention=mla "
                f"(whose RoPE part is model.mla.qk_rope_head_dim)")
        require(self.head_dim >= 2 and self.head_dim % 2 == 0,
                f"model.head_dim={self.head_dim} must be even for RoPE")
        require(self.rope_dim >= 2 and self.rope_dim % 2 == 0,
                f"model.rope_fraction={self.rope_fraction} of head_dim={self.head_dim} rotates {self.rope_dim} dims: "
                f"RoPE needs an even number >= 2")
        require(any(self.is_moe_layer(i) for i in range(self.n_layers)),
                f"model.moe.first_dense_layers={self.moe.first_dense_layers} leaves no MoE block among "
                f"model.n_layers={self.n_layers}: lower it")
        require(self.n_heads % self.n_kv_heads == 0,
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        per_layer = self.moe.num_experts_per_layer
        if per_layer is not None:
            require(len(per_layer) > 0, "model.moe.num_experts_per_layer=[] is empty: give one count per MoE "
                                        "layer, or null for model.moe.num_experts everywhere")
            moe_layers = [i for i in range(self.n_layers) if self.is_moe_layer(i)]
            require(self.moe.num_experts == max(per_layer),
                    f"model.moe.num_experts={self.moe.num_experts} must be the largest of "
                    f"model.moe.num_experts_per_layer={per_layer}")
            require(len(per_layer) == len(moe_layers),
                    f"model.moe.num_experts_per_layer has {len(per_layer)} entries for the {len(moe_layers)} MoE "
                    f"layers {moe_layers}: give one count per MoE layer")
            for layer, count in zip(moe_layers, per_layer):
                try:
                    self.moe_for_layer(layer)
                except ConfigError as err:
                    raise ConfigError(f"model.moe.num_experts_per_layer: layer {layer} with {count} experts: "
                                      f"{err}") from None

    @property
    def rope_dim(self) -> int:
        """Rotated dims of each head: the RoPE tables' width."""
        return self.mla.qk_rope_head_dim if self.attention == "mla" else int(self.head_dim * self.rope_fraction)

    def window_for_layer(self, layer: int) -> int:
        """The sliding window of block `layer` (0: full attention); an MTP block is like the last layer."""
        if not self.sliding_window:
            return 0
        types = self.layer_types
        return self.sliding_window if types is None or types[min(layer, self.n_layers - 1)] == "sliding" else 0

    @property
    def n_blocks(self) -> int:
        """Decoder blocks and MTP modules' blocks: indices n_layers.. are the MTP depths."""
        return self.n_layers + self.mtp_layers

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` has a MoE FFN; an MTP block is built like the last decoder block."""
        layer = min(layer, self.n_layers - 1)
        offset = layer - self.moe.first_dense_layers
        return offset >= 0 and offset % self.moe.every == 0

    def moe_for_layer(self, layer: int) -> MoEConfig:
        """The MoE settings of one MoE layer: num_experts from num_experts_per_layer when that is set."""
        per_layer = self.moe.num_experts_per_layer
        if per_layer is None:
            return self.moe
        layer = min(layer, self.n_layers - 1)
        index = sum(self.is_moe_layer(i) for i in range(layer))
        return dataclasses.replace(self.moe, num_experts=per_layer[index], num_experts_per_layer=None)


@dataclass(kw_only=True)
class PEFTConfig:
    """Parameter-efficient tuning: a router over low-rank adapters added to chosen linear maps."""

    method: Literal["none", "lora", "lora_moe", "rank1_moe"] = "none"
    """lora: one LoRA adapter of rank `rank` per target, no router (merges into the base exactly);
    lora_moe: `num_experts` LoRA adapters of rank `rank` per target, top_k routed (MixLoRA/MoLoRA);
    rank1_moe: one adapter of rank `rank` whose ranks are the experts, top_k of them routed (SMoRA)."""
    targets: list[str] = field(default_factory=lambda: ["*.attn.wq", "*.attn.wk", "*.attn.wv", "*.attn.wo"])
    """Shell-style patterns over the names of linear maps (nn.Linear modules), e.g. *.ffn.w_up."""
    num_experts: int = 4
    rank: int = 8
    top_k: int = 2
    alpha: float = 16.0
    """The adapters' sum is scaled by alpha / rank (LoRA)."""
    aux_loss_coef: float = 0.01
    """Weight of the adapters' routers' load-balancing loss (per sequence, layout-independent)."""

    def __post_init__(self) -> None:
        if self.method == "none":
            return
        require(self.rank >= 1 and self.num_experts >= 1, "model.peft.rank and model.peft.num_experts must be >= 1")
        require(bool(self.targets), "model.peft.targets is empty: name the linear maps that get adapters")
        if self.method == "lora":
            return  # num_experts and top_k do not apply
        experts = self.rank if self.method == "rank1_moe" else self.num_experts
        what = "model.peft.rank (rank1_moe: every rank is an expert)" if self.method == "rank1_moe" \
            else "model.peft.num_experts"
        require(1 <= self.top_k <= experts, f"model.peft.top_k={self.top_k} must be between 1 and {what}={experts}")

    @property
    def routed(self) -> bool:
        return self.method in ("lora_moe", "rank1_moe")

    @property
    def experts_and_rank(self) -> tuple[int, int]:
        """(experts, rank of each) of one target's adapter mixture."""
        if self.method == "lora":
            return 1, self.rank
        return (self.rank, 1) if self.method == "rank1_moe" else (self.num_experts, self.rank)
