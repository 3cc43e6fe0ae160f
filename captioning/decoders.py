"""The three caption decoders, each behind one step function.

    step(tokens, state, features) -> (logprobs, state, attention | None)

so greedy, sampling and beam search (decoding.py) are written once for all of them.
``start(grid, pooled)`` turns encoder output into the initial state and the per-image
``features`` that every step reads. State and features are tuples of batch-first tensors,
which is all beam search needs to reorder and expand them.

Dimensions: B batch, T caption length, P grid positions (49), C feature channels (1280),
E word embedding, H LSTM hidden, A attention, M merge layer, V vocabulary.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

State = tuple[torch.Tensor, ...]


class Decoder(nn.Module):
    """Base class: subclasses define ``start``, ``step`` and a teacher-forced ``forward``."""

    config: "DecoderConfig"
    has_attention: bool = False

    def _tie_if_asked(self) -> None:
        """With ``config.tie_weights`` the output layer shares ``embed.weight`` (V, E)."""
        if not self.config.tie_weights:
            return
        if self.fc.weight.shape != self.embed.weight.shape:
            raise ValueError(f"tie_weights needs the output layer to read {self.embed.weight.shape[1]} features "
                             f"(embed_dim) but it reads {self.fc.weight.shape[1]}; make them equal")
        self.fc.weight = self.embed.weight
        # nn.Embedding starts at N(0, 1): as softmax weights that gives logits of std ~sqrt(E) and a
        # first loss near 10. Tied models in Press & Wolf 2017 (after Zaremba et al. 2014) start
        # every weight at U(-0.1, 0.1).
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def start(self, grid: torch.Tensor, pooled: torch.Tensor) -> tuple[State, State]:
        """(B, P, C), (B, C) -> (initial state, per-image features for ``step``)."""
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state: State, features: State
             ) -> tuple[torch.Tensor, State, Optional[torch.Tensor]]:
        """tokens (B,) -> logprobs (B, V), next state, attention (B, P) or None."""
        raise NotImplementedError

    def forward(self, grid: torch.Tensor, pooled: torch.Tensor, captions: torch.Tensor, sample_prob: float = 0.0
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Training pass. captions (B, T) from <start> -> logprobs (B, T-1, V), attention (B, T-1, P) or None.

        ``sample_prob`` 0 is plain teacher forcing; above 0, scheduled sampling."""
        if sample_prob > 0:
            return self.forward_sampled(grid, pooled, captions, sample_prob)
        return self.teacher_forced(grid, pooled, captions)

    def teacher_forced(self, grid: torch.Tensor, pooled: torch.Tensor, captions: torch.Tensor
                       ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.forward_sampled(grid, pooled, captions, 0.0)

    def forward_sampled(self, grid: torch.Tensor, pooled: torch.Tensor, captions: torch.Tensor,
                        sample_prob: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Scheduled sampling (Bengio et al. 2015): each input token is, with probability
        ``sample_prob``, replaced by a word sampled from the model's previous prediction."""
        return step_through(self, grid, pooled, captions, sample_prob)


def step_through(model, grid, pooled, captions: torch.Tensor, sample_prob: float = 0.0
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Feed ``captions`` (B, T) from <start> through anything with ``start`` and ``step`` (a
    decoder, an ensemble) one token at a time -> logprobs (B, T-1, V), attention (B, T-1, P) or
    None. With ``sample_prob`` above 0, scheduled sampling (see ``Decoder.forward_sampled``)."""
    state, feats = model.start(grid, pooled)
    tokens = captions[:, 0]  # (B,)
    out, atts = [], []
    for t in range(captions.size(1) - 1):
        if t > 0 and sample_prob > 0:
            sampled = torch.multinomial(out[-1].detach().exp(), 1).squeeze(1)  # (B,)
            use = torch.rand(tokens.shape, device=tokens.device) < sample_prob
            tokens = torch.where(use, sampled, captions[:, t])
        elif t > 0:
            tokens = captions[:, t]
        logp, state, att = model.step(tokens, state, feats)
        out.append(logp)
        if att is not None:
            atts.append(att)
    return torch.stack(out, 1), (torch.stack(atts, 1) if atts else None)


@dataclass
class DecoderConfig:
    vocab_size: int
    feature_dim: int = 1280
    embed_dim: int = 512
    hidden_dim: int = 512
    dropout: float = 0.5
    # Press & Wolf 2017 ("Using the Output Embedding to Improve Language Models") and Inan et
    # al. 2017: the softmax layer reuses the input embedding matrix, so one matrix is trained
    # by both the words read and the words predicted.
    tie_weights: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {', '.join(sorted(unknown))}")
        return cls(**d)


@dataclass
class ShowTellConfig(DecoderConfig):
    pass


class ShowTell(Decoder):
    """Show and Tell / NIC (Vinyals et al. 2015, arXiv:1411.4555): the image embedding
    is injected as the LSTM's initial hidden and cell state."""

    def __init__(self, cfg: ShowTellConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.init_h = nn.Linear(cfg.feature_dim, cfg.hidden_dim)
        self.init_c = nn.Linear(cfg.feature_dim, cfg.hidden_dim)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.hidden_dim, batch_first=True)
        self.drop = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(cfg.hidden_dim, cfg.vocab_size)
        self._tie_if_asked()

    def start(self, grid, pooled):
        v = self.drop(pooled)  # (B, C)
        return (torch.tanh(self.init_h(v)), torch.tanh(self.init_c(v))), ()  # (B, H) x2

    def step(self, tokens, state, features):
        h, c = state
        e = self.embed(tokens).unsqueeze(1)  # (B, 1, E)
        out, (h, c) = self.lstm(e, (h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous()))
        logp = F.log_softmax(self.fc(self.drop(out[:, 0])), -1)  # (B, V)
        return logp, (h[0], c[0]), None

    def teacher_forced(self, grid, pooled, captions):
        # One nn.LSTM call over the whole caption: much faster than stepping.
        (h, c), _ = self.start(grid, pooled)
        e = self.embed(captions[:, :-1])  # (B, T-1, E)
        out, _ = self.lstm(e, (h.unsqueeze(0), c.unsqueeze(0)))  # (B, T-1, H)
        return F.log_softmax(self.fc(self.drop(out)), -1), None  # (B, T-1, V)


@dataclass
class MergeConfig(DecoderConfig):
    merge_dim: int = 512
    bidirectional: bool = False


class Merge(Decoder):
    """The merge architecture (Tanti, Gatt & Camilleri 2018, "Where to put the image in an
    image caption generator", arXiv:1703.09137): the LSTM reads only the caption prefix; the
    image vector joins its output outside the RNN, in a feed-forward layer that predicts the
    next word. With ``bidirectional`` the prefix is read both ways (re-encoded every step)."""

    def __init__(self, cfg: MergeConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.hidden_dim, batch_first=True, bidirectional=cfg.bidirectional)
        rnn_out = cfg.hidden_dim * (2 if cfg.bidirectional else 1)
        self.img = nn.Linear(cfg.feature_dim, cfg.merge_dim)
        self.merge = nn.Linear(rnn_out + cfg.merge_dim, cfg.merge_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(cfg.merge_dim, cfg.vocab_size)
        self._tie_if_asked()

    def _predict(self, rnn_out: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        # rnn_out (..., H'), img broadcastable (..., M) -> logprobs (..., V)
        img = img.expand(*rnn_out.shape[:-1], img.shape[-1])
        m = F.relu(self.merge(self.drop(torch.cat([rnn_out, img], -1))))  # (..., M)
        return F.log_softmax(self.fc(self.drop(m)), -1)

    def start(self, grid, pooled):
        img = F.relu(self.img(self.drop(pooled)))  # (B, M)
        B, H = pooled.size(0), self.config.hidden_dim
        if self.config.bidirectional:
            # The state is the prefix itself: a backward pass needs all of it again.
            return (torch.zeros(B, 0, dtype=torch.long, device=pooled.device),), (img,)
        z = pooled.new_zeros(B, H)
        return (z, z), (img,)

    def _encode_prefix(self, prefix: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.embed(prefix))  # h (2, B, H)
        return torch.cat([h[0], h[1]], -1)  # (B, 2H)

    def step(self, tokens, state, features):
        (img,) = features
        if self.config.bidirectional:
            prefix = torch.cat([state[0], tokens.unsqueeze(1)], 1)  # (B, t+1)
            return self._predict(self._encode_prefix(prefix), img), (prefix,), None
        h, c = state
        out, (h, c) = self.lstm(self.embed(tokens).unsqueeze(1), (h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous()))
        return self._predict(out[:, 0], img), (h[0], c[0]), None

    def teacher_forced(self, grid, pooled, captions):
        _, (img,) = self.start(grid, pooled)
        inp = captions[:, :-1]  # (B, T-1)
        if self.config.bidirectional:
            # Each position may only see its own prefix, so each prefix is encoded on its own.
            outs = torch.stack([self._encode_prefix(inp[:, : t + 1]) for t in range(inp.size(1))], 1)
        else:
            outs, _ = self.lstm(self.embed(inp))  # (B, T-1, H)
        return self._predict(outs, img.unsqueeze(1)), None


@dataclass
class ShowAttendTellConfig(DecoderConfig):
    attention_dim: int = 512
    deep_output: bool = False  # Xu et al. eq. 7: the word is read from h, the context and the previous word


class ShowAttendTell(Decoder):
    """Show, Attend and Tell (Xu et al. 2015, arXiv:1502.03044), soft attention: at every word
    the LSTM attends over the 7x7 grid; a gating scalar beta = sigmoid(f_beta(h)) scales the
    context. Training adds the doubly stochastic penalty lambda * sum_p (1 - sum_t alpha_tp)^2.
    With ``deep_output`` the next word is predicted as in the paper's eq. 7,
    L_o(E y_{t-1} + L_h h_t + L_z z_t), rather than from h_t alone."""

    has_attention = True

    def __init__(self, cfg: ShowAttendTellConfig):
        super().__init__()
        self.config = cfg
        C, H, A, E = cfg.feature_dim, cfg.hidden_dim, cfg.attention_dim, cfg.embed_dim
        self.embed = nn.Embedding(cfg.vocab_size, E)
        self.enc_att = nn.Linear(C, A)
        self.dec_att = nn.Linear(H, A)
        self.full_att = nn.Linear(A, 1)
        self.init_h = nn.Linear(C, H)
        self.init_c = nn.Linear(C, H)
        self.f_beta = nn.Linear(H, C)
        self.cell = nn.LSTMCell(E + C, H)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.deep_output:
            self.out_h = nn.Linear(H, E)
            self.out_z = nn.Linear(C, E)
        self.fc = nn.Linear(E if cfg.deep_output else H, cfg.vocab_size)
        self._tie_if_asked()

    def start(self, grid, pooled):
        mean = grid.mean(1)  # (B, C)
        state = (torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)))  # (B, H) x2
        return state, (grid, self.enc_att(grid))  # (B, P, C), (B, P, A)

    def step(self, tokens, state, features):
        h, c = state
        grid, att1 = features
        e = self.full_att(torch.relu(att1 + self.dec_att(h).unsqueeze(1))).squeeze(2)  # (B, P)
        alpha = torch.softmax(e, 1)  # (B, P)
        context = torch.bmm(alpha.unsqueeze(1), grid).squeeze(1)  # (B, C)
        context = torch.sigmoid(self.f_beta(h)) * context  # gating scalar beta, per channel as in Xu et al.
        emb = self.embed(tokens)  # (B, E)
        h, c = self.cell(torch.cat([emb, context], 1), (h, c))  # (B, H)
        out = torch.tanh(emb + self.out_h(h) + self.out_z(context)) if self.config.deep_output else h  # (B, E) or (B, H)
        return F.log_softmax(self.fc(self.drop(out)), -1), (h, c), alpha

    def teacher_forced(self, grid, pooled, captions):
        # Rows sorted by length: at step t only the captions still running are computed
        # (about half of the padded work). Pad positions get zeros; the loss masks them.
        B, T = captions.shape
        lengths = (captions != 0).sum(1)  # (B,) incl. <start>/<end>
        order = lengths.argsort(descending=True)
        inv = order.argsort()
        grid, pooled, captions, lengths = grid[order], pooled[order], captions[order], lengths[order]
        (h, c), (g, att1) = self.start(grid, pooled)
        V, P = self.config.vocab_size, grid.size(1)
        logps, alphas = [], []
        for t in range(T - 1):
            n = int((lengths > t + 1).sum())  # captions that still predict a word at step t
            lp, (hn, cn), a = self.step(captions[:n, t], (h[:n], c[:n]), (g[:n], att1[:n]))
            h = torch.cat([hn, h[n:]], 0)
            c = torch.cat([cn, c[n:]], 0)
            logps.append(torch.cat([lp, lp.new_zeros(B - n, V)], 0))
            alphas.append(torch.cat([a, a.new_zeros(B - n, P)], 0))
        return torch.stack(logps, 1)[inv], torch.stack(alphas, 1)[inv]  # (B, T-1, V), (B, T-1, P)


DECODERS: dict[str, tuple[type[Decoder], type[DecoderConfig]]] = {
    "show_tell": (ShowTell, ShowTellConfig),
    "merge": (Merge, MergeConfig),
    "show_attend_tell": (ShowAttendTell, ShowAttendTellConfig),
}


def build_decoder(kind: str, config: dict | DecoderConfig) -> Decoder:
    """Build a decoder by registry name from a config (dataclass or its dict)."""
    if kind not in DECODERS:
        raise KeyError(f"unknown decoder {kind!r}; valid: {', '.join(sorted(DECODERS))}")
    cls, cfg_cls = DECODERS[kind]
    cfg = config if isinstance(config, DecoderConfig) else cfg_cls.from_dict(config)
    return cls(cfg)


def decoder_kind(decoder: Decoder) -> str:
    for k, (cls, _) in DECODERS.items():
        if type(decoder) is cls:
            return k
    raise KeyError(type(decoder).__name__)
