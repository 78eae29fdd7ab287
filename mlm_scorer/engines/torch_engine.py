"""PyTorch engine (``--engine torch``): transformers' encoder layers with the head applied only at the
masked positions.

Weights come from the export itself, so any source (HF or TF-1) works: from ``model.onnx``'s initializers
when it exists and the ``onnx`` package is installed (fast, no TensorFlow), else from the SavedModel's
variables (needs TensorFlow). They are loaded into ``_MaskedLM``, built from the manifest's config:
transformers' ``BertLayer`` (every post-LayerNorm family: BERT, RoBERTa, XLM-R, DistilBERT, ELECTRA) or
``EsmLayer`` (ESM) for the encoder, and the embeddings and the MLM head written with the config's family
switches (position offset, token types or not, ELECTRA's projection, ESM's token dropout and rotary
positions), as the SavedModel graph computes them.

The forward pass: the embeddings and the layers, the last layer only at the masked positions (keys/values
from every token; see ``_encode_at``) -> [B,P,H] -> the head (transform + tied decoder) -> [B,P,V]
logits -> float32 log_softmax -> target log-prob and top-k, with the slot-padding rule (0.0, -1, -inf in
unused slots).

Options:
  device:    "cpu" (default) or "cuda" (device 0; "cuda:N" for another).
  precision: "fp32" (default); "bf16" on a CPU with AVX512-BF16/AMX (the model is cast to bf16: oneDNN
             runs the matmuls on AMX; the final log_softmax runs in fp32); "fp16" or "bf16" on CUDA (the
             same cast). A reduced-precision engine measures its drift against fp32 on this machine when it
             is created, prints it to stderr, records it in the manifest under
             ``reduced_precision["torch-<precision>-<device>"]``, and refuses to run (ModelError) where it
             exceeds ``MAX_DRIFT`` (mean |Δ log-prob| on the random drift inputs) or top-1 agreement falls
             under ``MIN_TOP1``.
  streams:   on CPU, batches scored at once, each on its own thread (default: one per CPU up to
             ``base.MAX_AUTO_STREAMS``; see ``base.plan_streams``); refused with device cuda.
  threads:   torch intra-op threads per stream (``torch.set_num_threads``: process-wide; alone, without
             streams: one stream of that many threads).
  memory:    on CPU, "retain" (default): glibc keeps freed memory for the next batch instead of giving it
             back to the kernel and page-faulting it in again (``_malloc.retain_freed_memory``; process-
             wide; +8-12 % copies per CPU-second at bert-base shape, 24 tokens); "system": leave malloc as it is.
"""
from __future__ import annotations

import re
import sys

import numpy as np

from ..errors import EngineError, MissingDependencyError, ModelError, UsageError
from ..model_dir import ModelDir
from ._malloc import retain_freed_memory
from .base import Batch, BatchResult, Engine, check_identity, plan_streams, refuse_streams_off_cpu

PRECISIONS = ("fp32", "bf16", "fp16")
MEMORY = ("retain", "system")
#: A reduced-precision torch engine refuses to run past these, measured at open on the random drift inputs
#: (measured: bf16 mean 0.008 on a random bert-base, 0.019 on the tests' tiny model with its wide weights).
MAX_DRIFT = 0.1
MIN_TOP1 = 0.8


def cpu_has_bf16() -> bool:
    """True if this CPU has native bf16 arithmetic (AVX512_BF16 or AMX-BF16; CPUID, see ``engines.cpu``)."""
    from .cpu import has_bf16

    return has_bf16()


def _torch_name(google: str) -> tuple[str, bool]:
    """(``_MaskedLM`` parameter name, transpose?) of a google-research/bert weight name. Kernels are
    [in, out]; torch Linear weights are [out, in]."""
    top = {
        "bert/embeddings/word_embeddings": "word_embeddings.weight",
        "bert/embeddings/position_embeddings": "position_embeddings.weight",
        "bert/embeddings/token_type_embeddings": "token_type_embeddings.weight",
        "bert/encoder/rotary/inv_freq": "inv_freq",
        "cls/predictions/output_bias": "output_bias",
    }
    if google in top:
        return top[google], False
    m = re.fullmatch(r"bert/encoder/layer_(\d+)/(.+)", google)
    if m:
        module, rest = f"layers.{m.group(1)}", m.group(2)
    else:
        prefixes = {"bert/embeddings/LayerNorm": "embeddings_norm", "bert/embeddings_project": "embeddings_project",
                    "bert/encoder/LayerNorm": "final_norm", "cls/predictions/transform/dense": "transform",
                    "cls/predictions/transform/LayerNorm": "transform_norm"}
        head, _, leaf = google.rpartition("/")
        if head not in prefixes:
            raise ModelError(f"unexpected weight {google!r} in the export")
        module, rest = prefixes[head], leaf
    rest = re.sub(r"(^|/)(kernel|gamma)$", r"\1weight", re.sub(r"(^|/)beta$", r"\1bias", rest))
    return f"{module}.{rest.replace('/', '.')}", google.endswith("/kernel")


def _build_net(cfg, weights: dict[str, np.ndarray]):
    """``_MaskedLM`` for the config (``mlm_export.config.BertConfig``), loaded with the export's weights.

    The layers are transformers' ``BertLayer`` (post-LayerNorm: every family but ESM) or ``EsmLayer``.
    """
    import torch
    from transformers.activations import ACT2FN

    if cfg.pre_layer_norm:
        from transformers import EsmConfig as LayerConfig
        from transformers.models.esm.modeling_esm import EsmLayer as Layer
    else:
        from transformers import BertConfig as LayerConfig
        from transformers.models.bert.modeling_bert import BertLayer as Layer

    nn = torch.nn
    H, E, V, eps = cfg.hidden_size, cfg.embedding_width, cfg.vocab_size, cfg.layer_norm_eps
    layer_cfg = LayerConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.hidden_act, layer_norm_eps=eps, max_position_embeddings=cfg.max_position_embeddings,
        **({"position_embedding_type": cfg.position_embedding_type} if cfg.pre_layer_norm else {}))
    layer_cfg._attn_implementation = "sdpa"  # what BertForMaskedLM picks by default

    class _MaskedLM(nn.Module):
        """The encoder: embeddings, transformers' layers, the MLM head (decoder tied to word_embeddings)."""

        def __init__(self):
            super().__init__()
            self.word_embeddings = nn.Embedding(V, E)
            if not cfg.rotary:
                self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, E)
            else:
                self.register_buffer("inv_freq", torch.zeros(H // cfg.num_attention_heads // 2))
            if cfg.type_vocab_size:
                self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, E)
            if cfg.embedding_layer_norm:
                self.embeddings_norm = nn.LayerNorm(E, eps=eps)
            if E != H:
                self.embeddings_project = nn.Linear(E, H)
            self.layers = nn.ModuleList(Layer(layer_cfg) for _ in range(cfg.num_hidden_layers))
            if cfg.pre_layer_norm:
                self.final_norm = nn.LayerNorm(H, eps=eps)
            self.transform = nn.Linear(H, E)
            self.head_act = ACT2FN[cfg.head_act or cfg.hidden_act]
            self.transform_norm = nn.LayerNorm(E, eps=eps)
            self.output_bias = nn.Parameter(torch.zeros(V))

    with _no_init_weights():  # every weight is loaded below: skip the random init (~1 s on bert-base)
        net = _MaskedLM().eval()
    state = {}
    for g, arr in weights.items():
        name, transpose = _torch_name(g)
        # torch wants writable arrays: a kernel is copied transposed anyway, the rest only where read-only
        state[name] = torch.from_numpy(np.ascontiguousarray(np.asarray(arr, np.float32).T) if transpose
                                       else _writable(arr))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"the export's weights do not fit its config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    return net


def _no_init_weights():
    """transformers' context that skips weight initialization (torch's init functions included; its module
    path depends on the version), else a no-op."""
    import contextlib

    for where in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return getattr(__import__(where, fromlist=["no_init_weights"]), "no_init_weights")()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def _writable(a: np.ndarray) -> np.ndarray:
    """``a`` as float32, copied only where needed (torch.from_numpy wants a writable array)."""
    a = np.asarray(a, np.float32)
    return a if a.flags.writeable else a.copy()


def load_export_weights(model: ModelDir) -> tuple[dict[str, np.ndarray], str]:
    """(google-named float32 weights, where from) for an export: model.onnx if usable, else the SavedModel."""
    onnx_path = model.path / "model.onnx"
    if onnx_path.is_file():
        try:
            import onnx
            from onnx import numpy_helper
        except ImportError:
            onnx = None
        if onnx is not None:
            m = onnx.load(str(onnx_path))
            w = {i.name[2:].replace("__", "/"): numpy_helper.to_array(i) for i in m.graph.initializer
                 if i.name.startswith("w.")}
            if _complete(model, w):  # else (an ONNX file written differently) read the SavedModel
                return {k: np.asarray(v, np.float32) for k, v in w.items()}, str(onnx_path)
    try:
        from ..logs import import_tensorflow

        tf = import_tensorflow()
    except ImportError:
        raise MissingDependencyError(
            f"engine 'torch' reads the weights from {onnx_path} (with the onnx package) or from the SavedModel "
            f"(with tensorflow); neither is available: pip install 'mlm-scorer[onnx]' and re-export with "
            f"--onnx, or pip install 'mlm-scorer[tf]'") from None
    reader = tf.train.load_checkpoint(str(model.path / "variables" / "variables"))
    w = {}
    for key in reader.get_variable_to_shape_map():
        m = re.fullmatch(r"v/(.+)/\.ATTRIBUTES/VARIABLE_VALUE", key)
        if m:
            w[m.group(1).replace(".S", "/")] = np.asarray(reader.get_tensor(key), np.float32)
    return w, str(model.path / "variables")


def _config(model: ModelDir):
    """The manifest's config as ``mlm_export.config.BertConfig``; ModelError if it lacks a key."""
    from mlm_export.config import BertConfig

    try:
        return BertConfig.from_dict({**model.manifest["config"], "vocab_size": model.manifest["vocab_size"]})
    except (KeyError, TypeError) as exc:
        raise ModelError(f"{model.path}: manifest config lacks {exc}; re-export the model") from None


def _complete(model: ModelDir, w: dict[str, np.ndarray]) -> bool:
    """True if ``w`` holds exactly the weights (names and shapes) the manifest's config needs."""
    from mlm_export.config import weight_shapes

    try:
        cfg = _config(model)
    except ModelError:
        return False
    shapes = weight_shapes(cfg)
    return set(w) == set(shapes) and all(tuple(w[k].shape) == shapes[k] for k in shapes)


def _rotate(t, rope):
    """t [B,N,Q,D] rotated by (cos, sin) [B|1,Q,D]: t*cos + rotate_half(t)*sin, in float32 as transformers."""
    import torch

    cos, sin = (r.unsqueeze(1) for r in rope)
    t32 = t.float()
    t1, t2 = t32.chunk(2, dim=-1)
    return (t32 * cos + torch.cat((-t2, t1), dim=-1) * sin).to(t.dtype)


class TorchEngine(Engine):
    name = "torch"
    OPTIONS = {"precision": "fp32 (default), bf16, fp16 (CUDA)", "device": "cpu or cuda[:N]",
               "threads": "threads per stream", "streams": "batches in flight at once on the CPU (default: from the CPUs)",
               "memory": "retain (default: keep freed memory for the next batch) or system"}

    def __init__(self, model: ModelDir, *, top_k: bool = False, precision: str = "fp32", device: str = "cpu",
                 threads: int | None = None, streams: int | str | None = None, memory: str = "retain",
                 **options):
        if options:
            raise UsageError(f"engine 'torch' does not take option(s): {', '.join(sorted(options))}; "
                             f"it takes precision, device, threads, streams, memory")
        if memory not in MEMORY:
            raise UsageError(f"engine 'torch' memory must be one of {', '.join(MEMORY)}, not {memory!r}")
        if precision not in PRECISIONS:
            raise UsageError(f"engine 'torch' precision must be one of {', '.join(PRECISIONS)}, not {precision!r}"
                             + ("; int8 is --engine onnx --precision int8" if precision == "int8" else ""))
        if not (device == "cpu" or re.fullmatch(r"cuda(:\d+)?", device)):
            raise UsageError(f"engine 'torch' device must be cpu or cuda[:N], not {device!r}")
        refuse_streams_off_cpu(streams, device, engine=self.name)
        try:
            import torch
            import transformers  # noqa: F401  (the encoder layers)
        except ImportError as exc:
            raise MissingDependencyError(f"engine 'torch' needs torch and transformers ({exc.name}): "
                                         f"pip install 'mlm-scorer[torch]'") from exc
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("device cuda: torch sees no CUDA GPU (torch.cuda.is_available() is False)")
        if device == "cpu" and precision == "fp16":
            raise UsageError("fp16 on CPU is not supported (no fast fp16 kernels); use --precision bf16 on a "
                             "CPU with AMX/AVX512-BF16, or --device cuda")
        if device == "cpu" and precision == "bf16" and not cpu_has_bf16():
            raise UsageError("bf16 on this CPU would be emulated (no avx512_bf16/amx_bf16 in /proc/cpuinfo) "
                             "and slower than fp32; use fp32 or --engine onnx --precision int8")
        if device == "cpu":
            self.streams, threads = plan_streams(streams, threads, engine=self.name)
        if threads:
            torch.set_num_threads(int(threads))
        # Before the stream threads exist (they are made on the first batch), so that they share the main arena.
        self.memory_retained = device == "cpu" and memory == "retain" and retain_freed_memory()
        self._torch = torch
        self.model = model
        self.want_top_k = top_k
        self.precision = precision
        self.device = torch.device(device)
        self.k = model.top_k

        weights, self.weights_from = load_export_weights(model)
        table = weights.get("bert/embeddings/position_embeddings")
        if table is not None:
            model.check_positions(int(table.shape[0]), f"{self.weights_from}, position_embeddings")
        self.cfg = _config(model)
        self.net = _build_net(self.cfg, weights).to(self.device)
        # rotary frequencies stay float32 whatever precision the model is cast to (as transformers keeps them)
        self._inv_freq = self.net.inv_freq.float().clone() if self.cfg.rotary else None
        # The weights must be the manifest's: checked in fp32, before any cast to a reduced precision.
        want_top_k, self.want_top_k = self.want_top_k, False
        self.identity_diff = check_identity(self, model, weights=self.weights_from)
        self.want_top_k = want_top_k
        if precision != "fp32":
            self._cast_and_report(precision)

    # -- precision ------------------------------------------------------------------------------------
    def _cast_and_report(self, precision: str) -> None:
        from mlm_export.drift import drift_inputs, drift_report, record_drift

        torch = self._torch
        feed = drift_inputs(int(self.model.manifest["vocab_size"]), self.model.max_seq_length,
                            mask_id=(self.model.manifest.get("special_token_ids") or {}).get("mask"))
        ref = self._forward(feed, want_top_k=True)  # fp32
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        # The whole model is cast (weights and activations): on CPU, oneDNN runs bf16 matmuls on AMX /
        # AVX512-BF16 and LayerNorm / softmax accumulate in fp32 internally. torch.autocast measured
        # slower than plain fp32 on bert-base on this CPU (it re-casts every fp32 weight on every call).
        # The final log_softmax over the vocabulary runs in fp32 (``_forward``).
        self.net.to(dtype)
        got = self._forward(feed, want_top_k=True)
        rep = drift_report(ref.log_probs, ref.top_k_ids[..., 0], got.log_probs, got.top_k_ids[..., 0],
                           feed["masked_lm_positions"])
        how = f"model cast to {dtype}, log_softmax in float32"
        rep.update({"baseline": f"torch fp32 {self.device.type}", "method": how, "torch": torch.__version__,
                    "inputs": "random masked copies (drift_inputs)"})
        self.drift = rep
        record_drift(self.model.path, f"torch-{precision}-{self.device.type}", rep,
                     log=lambda m: print(f"mlm-scorer: {m}", file=sys.stderr))
        if not (rep["mean_abs_diff"] <= MAX_DRIFT and rep["top1_agreement"] >= MIN_TOP1):
            from .cpu import int8_class

            where = f"this CPU ({int8_class()})" if self.device.type == "cpu" else f"this GPU ({self.device})"
            raise ModelError(f"{precision} is not used: on {where} it drifts {rep['mean_abs_diff']:.3g} nats per token "
                             f"from fp32 (mean |Δ log-prob|, at most {MAX_DRIFT:g}) with top-1 agreement "
                             f"{rep['top1_agreement']:.1%} (at least {MIN_TOP1:.0%}), measured just now on random "
                             f"masked copies; score with --precision fp32")

    # -- forward --------------------------------------------------------------------------------------
    def _forward(self, feed: dict[str, np.ndarray], want_top_k: bool) -> BatchResult:
        torch = self._torch
        dev = self.device
        t = {k: torch.from_numpy(np.ascontiguousarray(v, np.int64)).to(dev, non_blocking=True)
             for k, v in feed.items()}
        pos = t["masked_lm_positions"]
        with torch.inference_mode():
            g = self._encode_at(t["input_ids"], t["input_mask"], t["segment_ids"], pos)  # [B,P,H]
            net = self.net
            h = net.transform_norm(net.head_act(net.transform(g)))  # [B,P,E], head only at the masked positions
            logits = torch.nn.functional.linear(h, net.word_embeddings.weight, net.output_bias)  # [B,P,V]
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            valid = pos > 0
            target = torch.gather(log_probs, 2, t["masked_lm_ids"].unsqueeze(-1)).squeeze(-1)
            target = torch.where(valid, target, torch.zeros_like(target))
            res = BatchResult(log_probs=target.cpu().numpy().astype(np.float32, copy=False))
            if want_top_k:
                top_lp, top_ids = torch.topk(log_probs, self.k, dim=-1)
                vk = valid.unsqueeze(-1)
                top_lp = torch.where(vk, top_lp, torch.full_like(top_lp, float("-inf")))
                top_ids = torch.where(vk, top_ids, torch.full_like(top_ids, -1))
                res.top_k_ids = top_ids.to(torch.int32).cpu().numpy()
                res.top_k_log_probs = top_lp.cpu().numpy().astype(np.float32, copy=False)
        return res

    def _embed(self, input_ids, input_mask, segment_ids):
        """[B,T] x3 -> [B,T,H]: as BertEmbeddings (word + token type + position, LayerNorm) with the family's
        switches: position offset, no token types, ESM's token dropout, ELECTRA's projection."""
        torch, net, cfg = self._torch, self.net, self.cfg
        x = net.word_embeddings(input_ids)  # [B,T,E]
        if cfg.token_dropout:  # ESM: <mask> rows zeroed, the others rescaled by the row's share of <mask>
            is_mask = (input_ids == cfg.mask_token_id).unsqueeze(-1)
            observed = is_mask.sum(1).float() / input_mask.sum(-1, keepdim=True).float()  # [B,1]
            x = (x.masked_fill(is_mask, 0.0) * ((1 - 0.15 * 0.8) / (1 - observed))[:, None]).to(x.dtype)
        if cfg.type_vocab_size:
            x = x + net.token_type_embeddings(segment_ids)
        if not cfg.rotary:
            T = input_ids.shape[1]
            x = x + net.position_embeddings(torch.arange(cfg.position_offset, cfg.position_offset + T,
                                                         device=input_ids.device))
        if cfg.embedding_layer_norm:
            x = net.embeddings_norm(x)
        if cfg.embedding_width != cfg.hidden_size:
            x = net.embeddings_project(x)
        return x

    def _rope(self, positions, dtype):
        """Rotary (cos, sin) [B|1,Q,D] for int positions [B|1,Q], computed in float32 as EsmRotaryEmbedding."""
        freqs = positions[..., None].float() * self._inv_freq.to(positions.device)
        emb = self._torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _encode_at(self, input_ids, input_mask, segment_ids, pos):
        """The encoder's output [B,P,H] at the masked positions ``pos`` [B,P].

        transformers' layers, called one by one, so that the last layer runs only where it is read: its
        keys and values come from every token, its query, attention output and feed-forward only from the
        P gathered rows (as the SavedModel and ONNX graphs do; ~1/L of the encoder saved).
        """
        torch, cfg = self._torch, self.cfg
        x = self._embed(input_ids, input_mask, segment_ids)  # [B,T,H]
        # BERT's additive mask, as BertModel builds it for eager and SDPA attention alike.
        bias = (1.0 - input_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min  # [B,1,1,T]
        B, T, H = x.shape
        rope = self._rope(torch.arange(T, device=x.device)[None], x.dtype) if cfg.rotary else None
        layers = self.net.layers
        for layer in layers[:-1]:
            out = layer(x, bias, position_embeddings=rope) if cfg.pre_layer_norm else layer(x, bias)
            x = out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple, 5 a tensor
        last = layers[-1]
        att = last.attention.self
        N, D = att.num_attention_heads, att.attention_head_size
        rows = torch.gather(x, 1, pos.unsqueeze(-1).expand(-1, -1, H))  # [B,P,H]
        if not cfg.pre_layer_norm:
            q = att.query(rows).view(B, -1, N, D).transpose(1, 2)  # [B,N,P,D]
            k = att.key(x).view(B, T, N, D).transpose(1, 2)  # [B,N,T,D]
            v = att.value(x).view(B, T, N, D).transpose(1, 2)
            ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale 1/sqrt(D)
            a = last.attention.output(ctx.transpose(1, 2).reshape(B, -1, N * D), rows)  # dense, + rows, LayerNorm
            return last.output(last.intermediate(a), a)
        # ESM (EsmLayer): LayerNorm first, the query scaled then rotated; the residual needs no LayerNorm after.
        norm = last.attention.LayerNorm
        hx, hr = norm(x), norm(rows)
        q = att.query(hr).view(B, -1, N, D).transpose(1, 2) * D ** -0.5  # [B,N,P,D]
        k = att.key(hx).view(B, T, N, D).transpose(1, 2)
        v = att.value(hx).view(B, T, N, D).transpose(1, 2)
        if cfg.rotary:
            q, k = _rotate(q, self._rope(pos, x.dtype)), _rotate(k, rope)
        ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        a = last.attention.output(ctx.transpose(1, 2).reshape(B, -1, N * D), rows)  # dense, + rows
        return self.net.final_norm(last.output(last.intermediate(last.LayerNorm(a)), a))

    def score_batch(self, batch: Batch) -> BatchResult:
        """int32 [B,T]/[B,P] arrays in; log_probs float32 [B,P] (+ top-k int32/float32 [B,P,k]) out."""
        try:
            return self._forward(batch.as_dict(), self.want_top_k)
        except RuntimeError as exc:  # out of memory, bad index...
            raise EngineError(f"torch failed on a batch of shape {tuple(batch.input_ids.shape)}: "
                              f"{str(exc).splitlines()[0]}") from None

    def close(self) -> None:
        super().close()
        self.net = None

