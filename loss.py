"""Contrastive losses: InfoNCE against momentum keys with KL distillation, and the plain CLIP loss.

Notation: B queries (one micro-batch of the student), N keys = the K*B teacher features of the
accumulation window followed by the Q queue entries, D the embedding size. All logits and
softmaxes are computed in fp32, whatever the autocast precision of the encoders.

False negatives: a key whose group id equals the query's group (the same report text, or the same
study where a dataset records studies) is masked out of the logits, except the query's own positive. Such
a key is neither pushed away by InfoNCE nor given target mass by the teacher. Masking rather than
counting them as extra positives keeps exactly one positive per row, so the loss stays plain
InfoNCE, and stale queue copies of the query's own pair from an earlier epoch cannot become
negatives.
"""

import torch
import torch.nn.functional as F

# A large finite value, not -inf: a masked entry then has exactly zero probability and the KL term
# stays finite (0 * (log 0 - log 0) would be NaN).
MASKED_LOGIT = -1e9


def false_negative_mask(query_groups, key_groups, positive_index):
    """True where a key shares the query's group but is not its positive: (B,), (N,), (B,) -> (B, N)."""
    same_group = query_groups[:, None] == key_groups[None, :]      # (B, N)
    is_positive = torch.zeros_like(same_group)
    is_positive[torch.arange(len(positive_index)), positive_index] = True
    return same_group & ~is_positive


def masked_logits(queries, keys, logit_scale, mask):
    """Scaled cosine similarities (B, N) in fp32 or wider, with masked entries set to MASKED_LOGIT."""
    dtype = torch.promote_types(queries.dtype, torch.float32)  # bf16 autocast outputs go up to fp32
    logits = logit_scale.exp().to(dtype) * (queries.to(dtype) @ keys.to(dtype).T)  # (B, N)
    return logits.masked_fill(mask, MASKED_LOGIT)


def kl_divergence(target_logits, student_logits):
    """Mean over rows of KL(softmax(target) || softmax(student))."""
    log_p = F.log_softmax(target_logits, dim=1)
    log_q = F.log_softmax(student_logits, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def symmetric_infonce(image_queries, text_queries, image_keys, text_keys, logit_scale, mask, positive_index):
    """InfoNCE in both directions: image queries against text keys, text queries against image keys.

    Returns the two (B, N) logit matrices and the two cross-entropies; row i's positive is key
    positive_index[i].
    """
    logits_i2t = masked_logits(image_queries, text_keys, logit_scale, mask)  # (B, N)
    logits_t2i = masked_logits(text_queries, image_keys, logit_scale, mask)  # (B, N)
    infonce_i2t = F.cross_entropy(logits_i2t, positive_index)
    infonce_t2i = F.cross_entropy(logits_t2i, positive_index)
    return logits_i2t, logits_t2i, infonce_i2t, infonce_t2i


def msd_loss(
    image_queries, text_queries,    # student features of one micro-batch: (B, D) each
    image_targets, text_targets,    # teacher features of the same micro-batch, or None for no KL term
    image_keys, text_keys,          # teacher features of the whole window: (K*B, D) each
    key_groups,                     # (K*B,) group ids of the window's pairs
    image_queue, text_queue,        # teacher features of earlier steps: (Q, D) each, Q may be 0
    queue_groups,                   # (Q,)
    query_groups,                   # (B,) group ids of this micro-batch
    positive_index,                 # (B,) position of each query's own pair among the window keys
    logit_scale,                    # the student's learned log(1 / temperature), a scalar
    alpha: float,
) -> dict[str, torch.Tensor]:
    """Return `loss = (1 - alpha) * InfoNCE + alpha * KL(teacher || student)` and its terms by name.

    Image-to-text logits compare the student's image queries with every text key (window, then
    queue); text-to-image is the mirror image. The teacher's soft targets compare the teacher's
    own features of this micro-batch with the same keys, at the student's temperature, detached.
    Both terms are averaged over the two directions and the B rows.
    """
    all_text = torch.cat([text_keys, text_queue])      # (N, D)
    all_image = torch.cat([image_keys, image_queue])   # (N, D)
    all_groups = torch.cat([key_groups, queue_groups])  # (N,)
    mask = false_negative_mask(query_groups, all_groups, positive_index)  # (B, N)

    # InfoNCE in both directions: the positive of row i is its own pair's window key.
    logits_i2t, logits_t2i, infonce_i2t, infonce_t2i = symmetric_infonce(
        image_queries, text_queries, all_image, all_text, logit_scale, mask, positive_index)  # (B, N) logits
    infonce = (infonce_i2t + infonce_t2i) / 2

    # KL distillation towards the teacher's soft targets over the very same keys.
    if image_targets is None:
        kl = torch.zeros((), device=infonce.device)
    else:
        with torch.no_grad():
            scale = logit_scale.detach()
            targets_i2t = masked_logits(image_targets, all_text, scale, mask)
            targets_t2i = masked_logits(text_targets, all_image, scale, mask)
        kl = (kl_divergence(targets_i2t, logits_i2t) + kl_divergence(targets_t2i, logits_t2i)) / 2

    loss = (1.0 - alpha) * infonce + alpha * kl
    return {"loss": loss, "infonce": infonce, "kl": kl,
            "infonce_i2t": infonce_i2t, "infonce_t2i": infonce_t2i}


def clip_loss(image_features, text_features, groups, logit_scale) -> dict[str, torch.Tensor]:
    """Symmetric in-batch InfoNCE between student features (B, D), as in CLIP.

    Each pair's negatives are the other B - 1 pairs of the same batch (false negatives masked), so
    accumulating this loss over micro-batches is not the loss of the large batch.
    """
    positive_index = torch.arange(len(groups), device=groups.device)
    mask = false_negative_mask(groups, groups, positive_index)  # (B, B)
    _, _, infonce_i2t, infonce_t2i = symmetric_infonce(
        image_features, text_features, image_features, text_features, logit_scale, mask, positive_index)
    infonce = (infonce_i2t + infonce_t2i) / 2
    return {"loss": infonce, "infonce": infonce, "kl": torch.zeros_like(infonce),
            "infonce_i2t": infonce_i2t, "infonce_t2i": infonce_t2i}
