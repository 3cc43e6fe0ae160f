"""Self-critical sequence training (Rennie et al. 2017, "Self-critical Sequence Training for
Image Captioning", arXiv:1612.00563): fine-tune a decoder with REINFORCE on the CIDEr-D of
its own sampled captions.

The baseline is the mean reward of the *other* samples of the same image (Luo 2020, "A Better
Variant of Self-Critical Sequence Training", arXiv:2003.09971), so no greedy pass is needed.
The reward counts <end> as a word of both candidate and references, which penalises captions
that stop mid-phrase ("a dog runs on the") -- the bad-ending fix of ruotianluo's codebase.

Dimensions: B images, S samples per image, N = B*S sequences, L caption length, V vocabulary.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..decoding import SpecialIds, _constrain, tree_map
from ..metrics import CiderD  # noqa: F401 (CIDEr-D lives with the other metrics; its old import path)

EOS = "</s>"


def sample_with_logprobs(model, grid: torch.Tensor, pooled: torch.Tensor, samples: int, max_len: int,
                         ids: SpecialIds, generator: Optional[torch.Generator] = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``samples`` captions per image from the model, keeping the graph for REINFORCE.

    Args:
        grid: (B, P, C). pooled: (B, C).
    Returns:
        tokens (N, L) sampled ids, <end> included, pad after it; logprobs (N, L) of each sampled
        token (0 after <end>); finished (N,) whether the caption reached <end>. Rows are
        image-major: row b*S + s is sample s of image b.
    """
    # Start once per image, then copy: the attention projection of the grid is the costliest layer.
    state, feats = model.start(grid, pooled)
    state = tree_map(lambda x: x.repeat_interleave(samples, 0), state)
    feats = tree_map(lambda x: x.repeat_interleave(samples, 0), feats)
    N = grid.size(0) * samples
    tokens = torch.full((N,), ids.start, dtype=torch.long)
    seqs = torch.zeros(N, 0, dtype=torch.long)
    done = torch.zeros(N, dtype=torch.bool)
    out_tok, out_lp = [], []
    for t in range(max_len):
        logp, state, _ = model.step(tokens, state, feats)  # (N, V)
        # The policy is the *constrained* distribution, renormalised: left unnormalised, the words it
        # may never sample (<unk>) only ever receive the "raise everything else" part of the gradient
        # and soak up all probability mass within an epoch.
        logp = torch.log_softmax(_constrain(logp, seqs, t, ids, 1, 0, allow_unk=False), -1)
        nxt = torch.multinomial(logp.detach().exp(), 1, generator=generator).squeeze(1)  # (N,)
        lp = logp.gather(1, nxt[:, None]).squeeze(1)  # (N,)
        nxt = nxt.masked_fill(done, ids.pad)
        out_tok.append(nxt)
        out_lp.append(lp.masked_fill(done, 0.0))
        done = done | (nxt == ids.end)
        seqs = torch.cat([seqs, nxt[:, None]], 1)
        tokens = nxt
        if bool(done.all()):
            break
    return torch.stack(out_tok, 1), torch.stack(out_lp, 1), done


def scst_loss(model, grid: torch.Tensor, pooled: torch.Tensor, images: Sequence[str], cider: CiderD,
              itos: Sequence[str], samples: int = 5, max_len: int = 16, ids: SpecialIds = SpecialIds()
              ) -> tuple[torch.Tensor, float]:
    """REINFORCE loss with the leave-one-out mean baseline, and the mean CIDEr-D reward.

    Args:
        grid: (B, P, C). pooled: (B, C). images: the B image ids (keys of ``cider``'s references).
        itos: id -> word.
    Returns:
        (scalar loss, mean reward of the samples).
    """
    if samples < 2:
        raise ValueError("SCST with the leave-one-out baseline needs at least 2 samples per image")
    tokens, logp, finished = sample_with_logprobs(model, grid, pooled, samples, max_len, ids)
    rewards = np.zeros(tokens.size(0))
    tok = tokens.tolist()
    for i, row in enumerate(tok):
        words = []
        for w in row:
            if w == ids.end:
                words.append(EOS)
                break
            words.append(itos[w])
        rewards[i] = cider.score(images[i // samples], words)
    r = torch.from_numpy(rewards).float().view(-1, samples)  # (B, S)
    baseline = (r.sum(1, keepdim=True) - r) / (samples - 1)  # (B, S) mean of the other samples
    adv = (r - baseline).view(-1)  # (N,)
    mask = (tokens != ids.pad).float()  # (N, L): sampled tokens up to and including <end>
    loss = -(adv.unsqueeze(1) * logp * mask).sum() / mask.sum().clamp(min=1)
    return loss, float(r.mean())
