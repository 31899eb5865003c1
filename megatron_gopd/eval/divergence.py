"""How far a student is from its teacher on the student's own samples: the exact per-token reverse KL.

At every response position t of a sample y ~ pi_s, KL(pi_s(.|y_<t) || pi_T(.|y_<t)) over the whole vocabulary; the
evaluation reports its mean over all response tokens (what OPD minimises, without the sampling noise of the
one-token estimate log pi_s(y_t) - log pi_T(y_t)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def response_reverse_kl(student: torch.nn.Module, teacher: torch.nn.Module,
                        rows: list[tuple[list[int], list[int]]], *, batch_size: int = 8) -> list[float]:
    """Per (prompt_ids, response_ids) row, the sum over its response tokens of KL(student || teacher) of the
    next-token distributions (temperature 1) that predict them. Both models are HF causal LMs over one vocabulary."""
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"the student's vocabulary ({student.config.vocab_size}) is not the teacher's "
                         f"({teacher.config.vocab_size})")
    device = next(student.parameters()).device
    sums = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(p) + len(r) for p, r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)  # right padding: positions stay 0..L-1
        mask = torch.zeros_like(ids)
        for i, (prompt, response) in enumerate(chunk):
            ids[i, :len(prompt) + len(response)] = torch.tensor(prompt + response)
            mask[i, :len(prompt) + len(response)] = 1
        kl = _token_kl(student(input_ids=ids.to(device), attention_mask=mask.to(device)).logits,
                       teacher(input_ids=ids.to(device), attention_mask=mask.to(device)).logits).cpu()
        for i, (prompt, response) in enumerate(chunk):
            # the logits at position p predict token p + 1: the response's tokens come from len(prompt) - 1 on
            sums.append(kl[i, len(prompt) - 1:len(prompt) + len(response) - 1].sum().item())
    return sums


def _token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(student) || softmax(teacher)) at every position, [batch, seq], in fp32."""
    student_lp = torch.log_softmax(student_logits.float(), -1)
    teacher_lp = torch.log_softmax(teacher_logits.float(), -1)
    return F.kl_div(teacher_lp, student_lp, log_target=True, reduction="none").sum(-1)
