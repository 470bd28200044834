"""Hand-written reference forward passes, straight from each paper / reference implementation (not our code).

Every function takes float64 numpy arrays in the *file's* layout and returns ``(latents, reconstruction)``.
"""

from __future__ import annotations

import numpy as np


def relu(z):
    return np.maximum(z, 0.0)


def topk_dense(pre, k):
    """ReLU(TopK(pre)) scattered back to a dense vector (Gao et al.)."""
    out = np.zeros_like(pre)
    idx = np.argsort(-pre, axis=-1)[..., :k]
    np.put_along_axis(out, idx, relu(np.take_along_axis(pre, idx, -1)), -1)
    return out


def standardize(x, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    std = xc.std(-1, ddof=1, keepdims=True)
    return xc / (std + eps), mu, std


def gemma_scope(x, W_enc, b_enc, W_dec, b_dec, threshold, W_skip=None):
    """JumpReLU (Rajamanoharan et al. 2024; Gemma Scope tutorial): f = ReLU(pre) * 1[pre > theta]."""
    pre = x @ W_enc + b_enc
    f = relu(pre) * (pre > threshold)
    y = f @ W_dec + b_dec
    if W_skip is not None:
        y = y + x @ W_skip
    return f, y


def llama_scope(x, enc_w, enc_b, dec_w, dec_b, jt, norm_in, norm_out, d_model):
    """Llama Scope, SAELens convention: input scaled by s_in = sqrt(d)/norm_in; threshold jt * s_in compared with
    the pre-activation of the scaled input; output unscaled by s_out."""
    s_in = np.sqrt(d_model) / norm_in
    s_out = np.sqrt(d_model) / norm_out
    pre = (x * s_in) @ enc_w.T + enc_b
    f = relu(pre) * (pre > jt * s_in)
    y = (f @ dec_w.T + dec_b) / s_out
    return f, y


def openai_topk(x, pre_bias, enc_w, latent_bias, dec_w, k):
    """openai/sparse_autoencoder Autoencoder with normalize=True and TopK(k, ReLU)."""
    xn, mu, std = standardize(x)
    pre = (xn - pre_bias) @ enc_w.T + latent_bias
    f = topk_dense(pre, k)
    y = (f @ dec_w.T + pre_bias) * std + mu
    return f, y


def openai_relu(x, pre_bias, enc_w, latent_bias, dec_w):
    pre = (x - pre_bias) @ enc_w.T + latent_bias
    f = relu(pre)
    return f, f @ dec_w.T + pre_bias


def mlsae(x, enc_w, dec_w, pre_bias, k, standardize_input=True):
    """Lawson et al. MLSAE TopKSAE: standardise, subtract pre-encoder bias, TopK, no latent bias."""
    if standardize_input:
        xn, mu, std = standardize(x)
    else:
        xn, mu, std = x, 0.0, 1.0
    f = topk_dense((xn - pre_bias) @ enc_w.T, k)
    y = (f @ dec_w.T + pre_bias) * std + mu
    return f, y


def sparsify(x, enc_w, enc_b, W_dec, b_dec, k, transcode=False, W_skip=None):
    """EleutherAI sparsify SparseCoder: x - b_dec unless transcoder; ReLU, TopK; decode rows of W_dec."""
    xin = x if transcode else x - b_dec
    f = topk_dense(relu(xin @ enc_w.T + enc_b), k)
    y = f @ W_dec + b_dec
    if W_skip is not None:
        y = y + x @ W_skip.T
    return f, y


def saelens(x, st, cfg):
    """SAELens v6 SAE.forward for standard/topk/jumprelu/gated/(skip_)transcoder and its runtime normalisations."""
    arch = cfg["architecture"]
    norm = cfg.get("normalize_activations", "none")
    if norm == "constant_norm_rescale":
        c = np.sqrt(cfg["d_in"]) / np.linalg.norm(x, axis=-1, keepdims=True)
        xin = x * c
    elif norm == "layer_norm":
        xin, mu, std = standardize(x)
    else:
        xin = x
    if cfg.get("apply_b_dec_to_input", True) and "transcoder" not in arch:
        xin = xin - st["b_dec"]
    if arch == "gated":
        h = xin @ st["W_enc"]
        f = (h + st["b_gate"] > 0) * relu(xin @ (st["W_enc"] * np.exp(st["r_mag"])) + st["b_mag"])
    else:
        pre = xin @ st["W_enc"] + st["b_enc"]
        if arch == "topk":
            n = np.linalg.norm(st["W_dec"], axis=-1)
            if cfg.get("rescale_acts_by_decoder_norm"):
                pre = pre * n
            f = topk_dense(pre, cfg["k"])
        elif arch.startswith("jumprelu"):
            thr = st["threshold"] if "threshold" in st else np.exp(st["log_threshold"])
            f = relu(pre) * (pre > thr)
        else:
            f = relu(pre)
    fd = f / np.linalg.norm(st["W_dec"], axis=-1) if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm") else f
    y = fd @ st["W_dec"] + st["b_dec"]
    if "transcoder" not in arch:
        if norm == "constant_norm_rescale":
            y = y / c
        elif norm == "layer_norm":
            y = y * std + mu
    if "skip" in arch:
        y = y + x @ st["W_skip"].T
    return f, y


def dictionary_learning(x, dict_class, st):
    """saprmarks/dictionary_learning encode/decode per dict_class (inference defaults)."""
    if dict_class == "AutoEncoder":
        # load_dictionary -> from_pretrained(normalize_decoder=True): latents in unit-decoder-norm units.
        f = relu((x - st["bias"]) @ st["encoder.weight"].T + st["encoder.bias"])
        n = np.linalg.norm(st["decoder.weight"], axis=0)
        return f * n, f @ st["decoder.weight"].T + st["bias"]
    if dict_class == "AutoEncoderNew":
        f = relu(x @ st["encoder.weight"].T + st["encoder.bias"])
        return f, f @ st["decoder.weight"].T + st["decoder.bias"]
    if dict_class == "GatedAutoEncoder":
        x_enc = (x - st["decoder_bias"]) @ st["encoder.weight"].T
        f = (x_enc + st["gate_bias"] > 0) * relu(np.exp(st["r_mag"]) * x_enc + st["mag_bias"])
        return f, f @ st["decoder.weight"].T + st["decoder_bias"]
    if dict_class == "JumpReluAutoEncoder":
        pre = x @ st["W_enc"] + st["b_enc"]
        f = relu(pre * (pre > st["threshold"]))
        return f, f @ st["W_dec"] + st["b_dec"]
    if dict_class == "AutoEncoderTopK":
        post = relu((x - st["b_dec"]) @ st["encoder.weight"].T + st["encoder.bias"])
        f = topk_dense(post, int(st["k"]))
        return f, f @ st["decoder.weight"].T + st["b_dec"]
    if dict_class == "BatchTopKSAE":
        post = relu((x - st["b_dec"]) @ st["encoder.weight"].T + st["encoder.bias"])
        f = post * (post > st["threshold"])
        return f, f @ st["decoder.weight"].T + st["b_dec"]
    if dict_class == "MatryoshkaBatchTopKSAE":
        post = relu((x - st["b_dec"]) @ st["W_enc"] + st["b_enc"])
        f = post * (post > st["threshold"])
        return f, f @ st["W_dec"] + st["b_dec"]
    raise AssertionError(dict_class)
