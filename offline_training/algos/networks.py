"""
Network building blocks shared by the algorithms: MLPs, vectorised ensembles, critics, targets.

Initialisations follow the reference code each algorithm was written against (jaxrl5 for FISOR,
torch defaults for OSRL's baselines); ``init_linear`` names them.
"""

import math
from typing import Callable, Optional, Sequence, Tuple

from offline_training.algos import native
import torch
from torch import nn
from torch.autograd.function import once_differentiable
import torch.nn.functional as F


def init_linear(layer: nn.Linear, kind: str = 'xavier_uniform') -> nn.Linear:
    """Initialise a Linear layer as flax would: 'xavier_uniform' or 'lecun_normal', zero bias."""
    if kind == 'xavier_uniform':
        nn.init.xavier_uniform_(layer.weight)
    elif kind == 'lecun_normal':
        # flax's lecun_normal is a truncated normal with variance 1 / fan_in.
        std = 1.0 / math.sqrt(layer.in_features) / 0.87962566103423978
        nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    elif kind != 'torch':
        raise ValueError(f'unknown init {kind!r}: use xavier_uniform, lecun_normal or torch')
    if kind != 'torch' and layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def eager_cpu_float(x: torch.Tensor) -> bool:
    """
    Whether ``x`` may take the project's CPU forms (mish's, width-1 ensemble layers').

    A float32 or float64 CPU tensor outside tracing and ONNX export: a traced graph must hold
    torch's own operators, which the exporter maps (a Python autograd function it cannot).
    """
    return (x.device.type == 'cpu' and x.dtype in (torch.float32, torch.float64)
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not torch.onnx.is_in_onnx_export())


class _SigmoidMish(torch.autograd.Function):
    """
    mish(x) = x tanh(softplus(x)) through the sigmoid, with its derivative written out.

    With s = sigmoid(x) and p = s (2 - s): tanh(softplus(x)) = p / (2 - p), since 1 + e^x =
    1 / (1 - s) gives tanh(softplus(x)) = s (2 - s) / (1 + (1 - s)^2) and 1 + (1 - s)^2 = 2 - p;
    d mish / dx = tanh(softplus(x)) + x s (1 - tanh(softplus(x))^2). On this project's CPUs
    torch's own mish kernel (scalar tanh and softplus) took ~21 % of a FISOR `cpu` actor update;
    each step below is one pass over the activation (a new tensor only where one is needed), six
    forward and five backward, and on a [256, 512] activation this form is several times faster
    than torch's (`python bench/bench_fisor_kernels.py --kernels-only`) and as accurate (max error
    2e-6 against float64 over [-100, 100], torch's float32 mish 7e-7). First derivatives only: a
    second backward pass through it raises. Where the machine has a C compiler, ``_NativeMish``
    computes the same form in one compiled loop each way (``native``); this class serves the
    rest (float64, several threads, no compiler).
    """

    @staticmethod
    def forward(ctx, x):
        s, soft_tanh = _sigmoid_and_soft_tanh(x)
        ctx.save_for_backward(x, s, soft_tanh)
        return x * soft_tanh

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return _sigmoid_mish_slope(*ctx.saved_tensors, grad)


_ONE = torch.ones(())


def _sigmoid_and_soft_tanh(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    s = torch.sigmoid(x)
    p = torch.rsub(s, 2).mul_(s)                      # s (2 - s), in (0, 1]
    return s, p.div_(torch.rsub(p, 2))                # p / (2 - p) = tanh(softplus(x))


def _sigmoid_mish_slope(x: torch.Tensor, s: torch.Tensor, soft_tanh: torch.Tensor,
                        grad: torch.Tensor) -> torch.Tensor:
    # 1 - tanh^2 in one pass (addcmul of the 0-d one), then times s, x, plus tanh, times grad
    slope = torch.addcmul(_ONE.to(soft_tanh.dtype), soft_tanh, soft_tanh, value=-1)
    return slope.mul_(s).mul_(x).add_(soft_tanh).mul_(grad)


class _NativeMish(torch.autograd.Function):
    """The same sigmoid form in one compiled loop forward and one backward (``native``)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return native.mish_forward(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return native.mish_backward(x, grad)


def mish(x: torch.Tensor) -> torch.Tensor:
    """
    Return x tanh(softplus(x)), the mish activation (Misra 2019) of jaxrl5's networks.

    On a CPU, where torch's kernel is slow, the sigmoid form above: for float32 on one thread
    (the training rule) in the compiled loops of ``native`` when they are available, otherwise
    in torch's operators (float64 too; with more threads torch's operators run in parallel,
    the compiled loops would not). Everywhere else torch's own mish: on a GPU it is one fused
    kernel, in half precision it is the more accurate, and while a graph is traced for export it
    is aten::mish, which the exporter maps to ONNX operators of its own (export.py).
    """
    if not eager_cpu_float(x):
        if torch.compiler.is_compiling() and x.device.type == 'cpu':
            # inductor fuses the sigmoid form into a few passes (its own mish kernel on a CPU
            # took ~10x as long)
            return x * _sigmoid_and_soft_tanh(x)[1]
        return F.mish(x)
    if native.loops_apply(x):
        return _NativeMish.apply(x)
    return _SigmoidMish.apply(x)


def mish_value(x: torch.Tensor, loops: bool) -> torch.Tensor:
    """
    Return mish(x) of a CPU tensor outside autograd, in the loops or the sigmoid form.

    With :func:`mish_gradient`, the forms :func:`mish` takes on a CPU, for backward passes written
    out by hand (diffusion's MLPResNet); ``loops``: native.loops_apply(x) at the forward.
    """
    if loops:
        return native.mish_forward(x)
    return x * _sigmoid_and_soft_tanh(x)[1]


def mish_gradient(x: torch.Tensor, grad: torch.Tensor, loops: bool) -> torch.Tensor:
    """Return grad * mish'(x) in the form :func:`mish_value` took (``loops`` as there)."""
    if loops:
        return native.mish_backward(x, grad)
    return _sigmoid_mish_slope(x, *_sigmoid_and_soft_tanh(x), grad)


class Mish(nn.Module):
    """The module form of :func:`mish` (an ``activation`` for :func:`mlp`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish(x)


def mlp(dims: Sequence[int], activation: Callable[[], nn.Module] = nn.ReLU,
        output_activation: Optional[Callable[[], nn.Module]] = None,
        init: str = 'torch') -> nn.Sequential:
    """
    Build Linear layers through ``dims`` with ``activation`` between them.

    ``output_activation`` (e.g. nn.Tanh) follows the last layer when given.
    """
    if len(dims) < 2:
        raise ValueError(f'mlp needs at least input and output sizes, got {list(dims)}')
    layers = []
    for i in range(len(dims) - 1):
        layers.append(init_linear(nn.Linear(dims[i], dims[i + 1]), init))
        if i < len(dims) - 2:
            layers.append(activation())
        elif output_activation is not None:
            layers.append(output_activation())
    return nn.Sequential(*layers)


class VectorizedLinear(nn.Module):
    """
    ``ensemble_size`` independent Linear layers evaluated in one batched matmul.

    Input [E, B, in] (or [B, in], broadcast to every member), output [E, B, out].
    """

    def __init__(self, in_features: int, out_features: int, ensemble_size: int,
                 init: str = 'xavier_uniform'):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.ensemble_size = ensemble_size
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(ensemble_size, 1, out_features))
        for member in range(ensemble_size):
            layer = init_linear(nn.Linear(in_features, out_features), init)
            with torch.no_grad():
                self.weight[member].copy_(layer.weight.T)
                self.bias[member, 0].copy_(layer.bias)

    def forward(self, x: torch.Tensor, members: Optional[slice] = None) -> torch.Tensor:
        """Apply the layer of every member, or of ``members`` only (x then has that many)."""
        weight, bias = self.weight, self.bias
        if members is not None:
            weight, bias = weight[members], bias[members]
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(weight.shape[0], -1, -1)
        elif x.dim() != 3 or x.shape[0] != weight.shape[0]:
            raise ValueError(f'VectorizedLinear: input of shape {tuple(x.shape)} for '
                             f'{weight.shape[0]} members; give [B, in] or [members, B, in]')
        if self.out_features == 1 and eager_cpu_float(x):
            return _ThinEnsembleLinear.apply(x, weight, bias)
        if self.out_features == 1 and torch.compiler.is_compiling() and x.device.type == 'cpu':
            # compiled (FISOR's compiled steps): one fused multiply-and-sum each way, where the
            # batched product of this shape takes MKL's slow batched routine (_ThinEnsembleLinear)
            return (x * weight.transpose(1, 2)).sum(dim=-1, keepdim=True) + bias
        return torch.baddbmm(bias, x, weight)


class _ThinEnsembleLinear(torch.autograd.Function):
    """
    An ensemble layer of output width 1 (a critic's last layer) with the batch as the columns.

    out[e] = x[e] w[e] + b[e] for x [E, B, in], w [E, in, 1], b [E, 1, 1], computed as the
    product w[e]^T x[e]^T ([E, 1, in] x [E, in, B]) and read back transposed. On a CPU, torch's
    batched product of the natural shape sends the width-1 column through the BLAS library's
    batched routine, which on an AMD EPYC (Zen 4) took 144 us for a [2, 256, 256] x [2, 256, 1]
    layer (287 us with 4 members), against 33 us (69 us) for the transposed one; a
    matrix-vector product per member was as fast on large layers but cost ~10 us of dispatch
    per member on small ones (41 us against 3.5 us with [4, 8, 8]). Backward: grad_x = grad w^T
    (a broadcast multiply), grad_w = (grad^T x)^T (the same transposed shape, one call),
    grad_b = the sum of grad over the batch. First derivatives only (no critic loss of the
    project differentiates twice); GPUs, tracing and export keep ``baddbmm``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return _thin_forward(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return _thin_backward(*ctx.saved_tensors, grad, ctx.needs_input_grad)


def _thin_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # [E, 1, in] x [E, in, B] plus the bias of each member: [E, 1, B], returned as [E, B, 1]
    return torch.baddbmm(bias, weight.transpose(1, 2), x.transpose(1, 2)).transpose(1, 2)


def _thin_backward(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor,
                   needs: Sequence[bool]) -> Tuple[Optional[torch.Tensor], ...]:
    """Return the gradients of (x, weight, bias) that ``needs`` asks for (None for the rest)."""
    grad_x = grad_weight = grad_bias = None
    if needs[0]:
        grad_x = grad * weight.transpose(1, 2)
    if needs[1]:
        grad_weight = grad.transpose(1, 2).bmm(x).transpose(1, 2)     # [E, 1, in] as [E, in, 1]
    if needs[2]:
        grad_bias = grad.sum(dim=1, keepdim=True)
    return grad_x, grad_weight, grad_bias


class EnsembleMLP(nn.Module):
    """An ensemble of MLPs with a scalar output: input [B, in] -> output [E, B]."""

    def __init__(self, in_dim: int, hidden: Sequence[int], ensemble_size: int,
                 activation: Callable[[], nn.Module] = nn.ReLU, init: str = 'xavier_uniform'):
        super().__init__()
        dims = [in_dim, *hidden, 1]
        layers = []
        for i in range(len(dims) - 1):
            layers.append(VectorizedLinear(dims[i], dims[i + 1], ensemble_size, init))
            if i < len(dims) - 2:
                layers.append(activation())
        self.net = nn.Sequential(*layers)
        self.ensemble_size = ensemble_size
        self._relu_layers = activation is nn.ReLU

    # ReLU ensembles on a CPU through one autograd node (_ReluEnsembleWithBackward);
    # bench/bench_fisor_kernels.py turns it off to compare
    backward_written_out = True

    def forward(self, x: torch.Tensor, members: Optional[slice] = None) -> torch.Tensor:
        """Return [E, B], or [len(members), B] evaluating only the members ``members`` selects."""
        if (members is None and self.backward_written_out and self._relu_layers
                and eager_cpu_float(x) and x.dim() == 2):
            # on a CPU: the same operations as one autograd node, activations rectified in place
            params = [p for layer in self.net if isinstance(layer, VectorizedLinear)
                      for p in (layer.weight, layer.bias)]
            return _ReluEnsembleWithBackward.apply(x, *params).squeeze(-1)
        if members is None:
            return self.net(x).squeeze(-1)
        for layer in self.net:
            x = layer(x, members) if isinstance(layer, VectorizedLinear) else layer(x)
        return x.squeeze(-1)


class _ReluEnsembleWithBackward(torch.autograd.Function):
    """
    An EnsembleMLP of ReLU layers on a shared [B, in] input, with its backward written out.

    The modules' operations in their order (the batched products with their bias, ReLU, the
    width-1 last layer's transposed product), and in the backward the products as torch's
    baddbmm backward takes them, ReLU's mask, the input's gradient summed over the members as
    the broadcast's backward sums it: the same numbers as autograd through the modules
    (test_algos, bit for bit), as one autograd node, each activation rectified in place (the
    modules allocate a second tensor for it). A FISOR critic update runs two with their
    backward (Q, V) and forward-only ones (the target critics, the next states' values). First
    derivatives only.
    """

    @staticmethod
    def forward(ctx, x, *params):
        weights, biases = params[0::2], params[1::2]
        h = x.unsqueeze(0).expand(weights[0].shape[0], -1, -1)
        inputs = []
        for weight, bias in zip(weights[:-1], biases[:-1]):
            inputs.append(h)
            h = torch.baddbmm(bias, h, weight).relu_()
        inputs.append(h)
        # saved as autograd saves: freed after the backward unless the graph is retained, and
        # checked against in-place changes since the forward
        ctx.save_for_backward(x, *weights, *inputs[1:])
        ctx.layers = len(weights)
        return _thin_forward(h, weights[-1], biases[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, *saved = ctx.saved_tensors
        layers = ctx.layers
        weights = saved[:layers]
        inputs = [x.unsqueeze(0).expand(weights[0].shape[0], -1, -1), *saved[layers:]]
        need = ctx.needs_input_grad
        grads = [None] * (2 * layers)
        last = layers - 1
        g, grads[2 * last], grads[2 * last + 1] = _thin_backward(
            inputs[last], weights[last], grad, (True, need[1 + 2 * last], need[2 + 2 * last]))
        for k in reversed(range(last)):
            g = torch.ops.aten.threshold_backward(g, inputs[k + 1], 0)    # ReLU's backward
            if need[1 + 2 * k]:
                grads[2 * k] = inputs[k].transpose(1, 2).bmm(g)
            if need[2 + 2 * k]:
                grads[2 * k + 1] = g.sum(dim=1, keepdim=True)
            if k > 0 or need[0]:
                g = g.bmm(weights[k].transpose(1, 2))
        grad_x = g.sum(dim=0) if need[0] else None
        return (grad_x, *grads)


class QEnsemble(nn.Module):
    """``num_heads`` Q(s, a) networks; forward returns [num_heads, B] (or [len(members), B])."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256),
                 num_heads: int = 2, init: str = 'xavier_uniform'):
        super().__init__()
        self.net = EnsembleMLP(obs_dim + act_dim, hidden, num_heads, init=init)
        self.num_heads = num_heads

    def forward(self, obs: torch.Tensor, act: torch.Tensor,
                members: Optional[slice] = None) -> torch.Tensor:
        return self.net(torch.cat([obs, act], dim=-1), members)


class ValueNet(nn.Module):
    """A state-value network V(s); forward returns [B]."""

    def __init__(self, obs_dim: int, hidden: Sequence[int] = (256, 256),
                 init: str = 'xavier_uniform'):
        super().__init__()
        self.net = mlp([obs_dim, *hidden, 1], nn.ReLU, init=init)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak-average ``source`` into ``target``: theta' <- (1 - tau) theta' + tau theta."""
    target_params = list(target.parameters())
    source_params = list(source.parameters())
    torch._foreach_lerp_(target_params, source_params, tau)
