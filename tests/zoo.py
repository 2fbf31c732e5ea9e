"""A zoo of small architectures written in different styles, for the symmetry-detection tests.

Each entry builds a model, an example input (a tensor, a tuple of positional inputs or a dict of
keyword inputs) and a loss on that output. Every normalization's ε is a constructor argument, so
the float64 invariance checks can run with ε ≈ 0 (physics.md §4.13: BatchNorm in train mode
rejects ε = 0, so 1e-30 is used there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class MLPLayerNorm(nn.Module):
    """Linear → LayerNorm → ReLU, twice, then a softmax head (nested Sequentials)."""

    def __init__(self, d: int = 12, h: int = 16, classes: int = 5, eps: float = 1e-5) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Sequential(nn.Linear(d, h), nn.LayerNorm(h, eps=eps), nn.ReLU()),
            nn.Sequential(nn.Linear(h, h), nn.LayerNorm(h, eps=eps), nn.ReLU()),
        )
        self.head = nn.Linear(h, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class BasicBlock(nn.Module):
    """Post-activation ResNet block: conv → BN → ReLU → conv → BN, + shortcut, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, eps: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, eps=eps)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out, eps=eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PostActResNet(nn.Module):
    """A tiny post-activation ResNet (He et al. 2016a)."""

    def __init__(self, classes: int = 4, eps: float = 1e-5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, eps=eps), nn.ReLU())
        self.layers = nn.ModuleList([BasicBlock(8, 8, 1, eps), BasicBlock(8, 12, 2, eps)])
        self.fc = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.layers:
            x = block(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class PreActBlock(nn.Module):
    """Pre-activation block: BN → ReLU → conv → BN → ReLU → conv, + shortcut (He et al. 2016b)."""

    def __init__(self, c_in: int, c_out: int, stride: int, eps: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.bn2 = nn.BatchNorm2d(c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """A tiny pre-activation ResNet whose convolutions keep their biases."""

    def __init__(self, classes: int = 4, eps: float = 1e-5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(PreActBlock(8, 8, 1, eps), PreActBlock(8, 12, 2, eps))
        self.bn = nn.BatchNorm2d(12, eps=eps)
        self.fc = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class GroupNormCNN(nn.Module):
    """conv → GroupNorm → ReLU twice, max pool between, average pool and a head."""

    def __init__(self, classes: int = 4, eps: float = 1e-5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn1 = nn.GroupNorm(2, 8, eps=eps)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.gn2 = nn.GroupNorm(3, 12, eps=eps)
        self.fc = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.gn1(self.conv1(x))), 2)
        x = F.relu(self.gn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Seq2Seq(nn.Module):
    """``torch.nn.Transformer`` (encoder + decoder), embeddings, learned positions and a head.

    ``forward(src, tgt)`` takes two token tensors (a multi-input forward).
    """

    def __init__(self, vocab: int = 11, d: int = 16, norm_first: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        self.src_emb = nn.Embedding(vocab, d)
        self.tgt_emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, 8, d) * 0.1)
        self.transformer = nn.Transformer(d, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=24,
                                          dropout=0.0, batch_first=True, norm_first=norm_first, layer_norm_eps=eps)
        self.head = nn.Linear(d, vocab)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        s = self.src_emb(src) + self.pos[:, : src.shape[1]]
        t = self.tgt_emb(tgt) + self.pos[:, : tgt.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=s.dtype)
        return self.head(self.transformer(s, t, tgt_mask=mask, tgt_is_causal=True))


class TiedLM(nn.Module):
    """A language model whose output matrix is its input embedding (tied), keyword inputs."""

    def __init__(self, vocab: int = 13, d: int = 16, eps: float = 1e-5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(d, 32)
        self.fc2 = nn.Linear(32, d)

    def forward(self, tokens: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        h = self.ln(self.emb(tokens))
        h = self.fc2(F.relu(self.fc1(h)))
        return F.linear(h, self.emb.weight) / temperature


class Untraceable(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it): the depth depends on the input."""

    def __init__(self, d: int = 10, h: int = 16, classes: int = 3, eps: float = 1e-5) -> None:
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.bn = nn.BatchNorm1d(h, eps=eps)
        self.blocks = nn.ModuleList([nn.Linear(h, h) for _ in range(3)])
        self.out = nn.Linear(h, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.inp(x)))
        steps = 1 + int(x.abs().sum().item() > 0.0) + int(h.shape[0] > 4)
        for block in self.blocks[:steps]:
            if h.mean() > -1e9:
                h = F.leaky_relu(block(h), 0.1)
        return self.out(h)


class FunctionalCNN(nn.Module):
    """Every op called functionally on raw parameters: F.conv2d, F.batch_norm, F.relu, F.linear."""

    def __init__(self, classes: int = 4, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.w1 = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(6) * 0.1)
        self.gamma = nn.Parameter(1 + 0.1 * torch.randn(6))
        self.beta = nn.Parameter(0.1 * torch.randn(6))
        self.register_buffer("running_mean", torch.zeros(6))
        self.register_buffer("running_var", torch.ones(6))
        self.w2 = nn.Parameter(torch.randn(classes, 6 * 4 * 4) * 0.1)
        self.b2 = nn.Parameter(torch.zeros(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.w1, self.b1, padding=1)
        h = F.batch_norm(h, self.running_mean, self.running_var, self.gamma, self.beta, self.training, 0.1, self.eps)
        h = F.max_pool2d(F.relu(h), 2)
        return F.linear(h.flatten(1), self.w2, self.b2)


class MyConv(nn.Conv2d):
    """A custom subclass that only changes the initialization."""

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class MyLinear(nn.Linear):
    """A custom subclass with its own forward (same computation, written out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t() + self.bias


class NestedCustom(nn.Module):
    """Custom subclasses of nn.Conv2d / nn.Linear inside ModuleDict / ModuleList / Sequential."""

    def __init__(self, classes: int = 4, eps: float = 1e-5) -> None:
        super().__init__()
        self.features = nn.ModuleDict({
            "block": nn.ModuleList([nn.Sequential(MyConv(3, 8, 3, padding=1), nn.BatchNorm2d(8, eps=eps), nn.ReLU()),
                                    nn.Sequential(MyConv(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))]),
        })
        self.classifier = nn.Sequential(nn.Flatten(), MyLinear(8 * 4 * 4, 16), nn.ReLU(), MyLinear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.features["block"]:
            x = block(x)
        return self.classifier(x)


class TwoInputs(nn.Module):
    """An image branch and a feature branch merged by concatenation; keyword inputs."""

    def __init__(self, classes: int = 3, eps: float = 1e-5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6, eps=eps)
        self.mlp = nn.Linear(5, 6)
        self.ln = nn.LayerNorm(6, eps=eps)
        self.head = nn.Linear(12, classes)

    def forward(self, image: torch.Tensor, *, features: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        a = F.relu(self.bn(self.conv(image))).mean((2, 3))
        b = F.relu(self.ln(self.mlp(features)))
        return self.head(torch.cat([a, b], dim=1) * scale)


class WSConv2d(nn.Conv2d):
    """Weight-standardized convolution (a subclass overriding forward)."""

    def __init__(self, *args: Any, eps: float = 1e-5, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mu = w.mean((1, 2, 3), keepdim=True)
        sd = torch.sqrt(w.var((1, 2, 3), keepdim=True, unbiased=False) + self.eps)
        return F.conv2d(x, (w - mu) / sd, self.bias, self.stride, self.padding)


class WSNet(nn.Module):
    """Weight-standardized convs (no norm after the first) and a weight-normalized head."""

    def __init__(self, classes: int = 4, eps: float = 1e-5) -> None:
        super().__init__()
        self.conv1 = WSConv2d(3, 8, 3, padding=1, eps=eps)
        self.conv2 = WSConv2d(8, 8, 3, padding=1, eps=eps)
        self.gn = nn.GroupNorm(4, 8, eps=eps)
        self.fc1 = nn.utils.parametrizations.weight_norm(nn.Linear(8, 16))
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv1(x))
        x = F.relu(self.gn(self.conv2(x)))
        return self.fc2(F.relu(self.fc1(x.mean((2, 3)))))


class Attention(nn.Module):
    """Multi-head self-attention from separate q/k/v/o projections and F.scaled_dot_product_attention,
    with an optional QK-norm (a LayerNorm over each head's features)."""

    def __init__(self, d: int, heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.qn = nn.LayerNorm(d // heads, eps=eps, elementwise_affine=False) if qk_norm else None
        self.kn = nn.LayerNorm(d // heads, eps=eps, elementwise_affine=False) if qk_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.qn is not None:
            q, k = self.qn(q), self.kn(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, heads, t, d_head)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class GPTish(nn.Module):
    """A pre-LN decoder: token + position embeddings, attention and MLP blocks, final LayerNorm."""

    def __init__(self, vocab: int = 17, d: int = 16, heads: int = 2, depth: int = 2, qk_norm: bool = False,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(8, d)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict({
                "ln1": nn.LayerNorm(d, eps=eps), "attn": Attention(d, heads, qk_norm, eps),
                "ln2": nn.LayerNorm(d, eps=eps), "fc": nn.Linear(d, 2 * d), "proj": nn.Linear(2 * d, d)}))
        self.ln_f = nn.LayerNorm(d, eps=eps)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = x + blk["attn"](blk["ln1"](x))
            x = x + blk["proj"](F.gelu(blk["fc"](blk["ln2"](x))))
        return self.head(self.ln_f(x))


class ConvNeXtish(nn.Module):
    """A ConvNeXt-style block: depthwise conv, channels-last LayerNorm, MLP with GELU, layer scale."""

    def __init__(self, classes: int = 4, eps: float = 1e-6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.ln = nn.LayerNorm(8, eps=eps)
        self.pw1 = nn.Linear(8, 16)
        self.pw2 = nn.Linear(16, 8)
        self.gamma = nn.Parameter(0.5 * torch.ones(8))
        self.norm = nn.LayerNorm(8, eps=eps)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.ln(self.dw(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pw2(F.gelu(self.pw1(y)))
        x = x + y.permute(0, 3, 1, 2)
        return self.head(self.norm(x.mean((2, 3))))


class RMSMLP(nn.Module):
    """Linear → RMSNorm → ReLU → Linear, and an instance-normalized conv branch summed into the logits."""

    def __init__(self, classes: int = 3, eps: float = 1e-6) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 12)
        self.rms = nn.RMSNorm(12, eps=eps)
        self.fc2 = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.rms(self.fc1(x))))


class InstanceNormCNN(nn.Module):
    """conv → InstanceNorm (affine) → ReLU → pool → head."""

    def __init__(self, classes: int = 3, eps: float = 1e-5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(6, affine=True, eps=eps)
        self.fc = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.inorm(self.conv(x))).mean((2, 3)))


class SigmoidHead(nn.Module):
    """A multi-label head with binary cross-entropy: no translation symmetry."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


@dataclass
class Case:
    """One zoo entry: a model factory, an input factory and a loss on (output, batch seed)."""

    name: str
    build: Callable[[float], nn.Module]
    inputs: Callable[[torch.Generator], Any]
    loss: Callable[[Any, torch.Generator], torch.Tensor]


def _images(n: int = 6, size: int = 8) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)


def _ce(classes: int) -> Callable[[Any, torch.Generator], torch.Tensor]:
    def loss(out: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        out = out.reshape(-1, classes)
        y = torch.randint(0, classes, (out.shape[0],), generator=g)
        return F.cross_entropy(out, y)

    return loss


def _tokens(vocab: int, n: int = 4, t: int = 6) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randint(0, vocab, (n, t), generator=g)


def _bce(out: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out, torch.rand(out.shape, generator=g, dtype=out.dtype))


ZOO: list[Case] = [
    Case("mlp_layernorm", lambda eps: MLPLayerNorm(eps=eps), lambda g: torch.randn(16, 12, generator=g,
                                                                                    dtype=torch.float64), _ce(5)),
    Case("postact_resnet", lambda eps: PostActResNet(eps=eps), _images(), _ce(4)),
    Case("preact_resnet", lambda eps: PreActResNet(eps=eps), _images(), _ce(4)),
    Case("groupnorm_cnn", lambda eps: GroupNormCNN(eps=eps), _images(4), _ce(4)),
    Case("transformer_postln", lambda eps: Seq2Seq(norm_first=False, eps=eps),
         lambda g: (_tokens(11)(g), _tokens(11, t=5)(g)), _ce(11)),
    Case("transformer_preln", lambda eps: Seq2Seq(norm_first=True, eps=eps),
         lambda g: (_tokens(11)(g), _tokens(11, t=5)(g)), _ce(11)),
    Case("tied_lm", lambda eps: TiedLM(eps=eps), lambda g: {"tokens": _tokens(13)(g), "temperature": 0.7}, _ce(13)),
    Case("untraceable", lambda eps: Untraceable(eps=eps), lambda g: torch.randn(8, 10, generator=g,
                                                                                 dtype=torch.float64), _ce(3)),
    Case("functional_cnn", lambda eps: FunctionalCNN(eps=eps), _images(), _ce(4)),
    Case("nested_custom", lambda eps: NestedCustom(eps=eps), _images(), _ce(4)),
    Case("two_inputs", lambda eps: TwoInputs(eps=eps),
         lambda g: {"image": _images()(g), "features": torch.randn(6, 5, generator=g, dtype=torch.float64)}, _ce(3)),
    Case("ws_weightnorm", lambda eps: WSNet(eps=eps), _images(4), _ce(4)),
    Case("gpt_preln", lambda eps: GPTish(eps=eps), _tokens(17), _ce(17)),
    Case("gpt_qknorm", lambda eps: GPTish(qk_norm=True, depth=1, eps=eps), _tokens(17), _ce(17)),
    Case("convnext", lambda eps: ConvNeXtish(eps=eps), _images(4), _ce(4)),
    Case("rmsnorm_mlp", lambda eps: RMSMLP(eps=eps), lambda g: torch.randn(12, 10, generator=g,
                                                                            dtype=torch.float64), _ce(3)),
    Case("instancenorm_cnn", lambda eps: InstanceNormCNN(eps=eps), _images(4), _ce(3)),
    Case("sigmoid_head", lambda eps: SigmoidHead(eps=eps), lambda g: torch.randn(10, 8, generator=g,
                                                                                  dtype=torch.float64), _bce),
]


def build(case: Case, *, eps: float = 1e-30, seed: int = 0) -> nn.Module:
    """The case's model in float64, train mode, with ε replaced (1e-30: exact invariance checks)."""
    torch.manual_seed(seed)
    model = case.build(eps).double().train()
    return model


def batch(case: Case, seed: int) -> tuple[Any, torch.Generator]:
    g = torch.Generator().manual_seed(seed)
    return case.inputs(g), g


def call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)


def loss_of(case: Case, model: nn.Module, seed: int) -> torch.Tensor:
    """The case's loss on batch ``seed`` (targets drawn from the same generator)."""
    x, g = batch(case, seed)
    torch.manual_seed(1000 + seed)  # dropout masks, if any, are the same for every evaluation
    return case.loss(call(model, x), g)


__all__ = ["ZOO", "Case", "batch", "build", "call", "loss_of"]
