"""The method's core guarantees, checked against independent naive computations.

Accumulating K micro-batches against momentum keys gives the gradient of one batch of K*B; naive
accumulation of the in-batch CLIP loss does not. The loss terms, the EMA teacher and the queues
behave as the training loop relies on.
"""

import math

import pytest
import torch

from loss import clip_loss, false_negative_mask, msd_loss
from model import ImageTextModel, ModelConfig
from momentum import EMATeacher, FeatureQueue

TINY = ModelConfig(image_size=16, patch_size=8, vision_width=32, vision_depth=2, vision_heads=2,
                   vocab_size=50, max_len=12, text_width=32, text_depth=2, text_heads=2, embed_dim=16)


def make_batch(n, cfg=TINY, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, cfg.channels, cfg.image_size, cfg.image_size, generator=g, dtype=dtype)
    lengths = torch.randint(3, cfg.max_len + 1, (n,), generator=g)
    input_ids = torch.randint(5, cfg.vocab_size, (n, cfg.max_len), generator=g)
    input_ids[:, 0] = 2  # [CLS]
    attention_mask = torch.arange(cfg.max_len)[None, :] < lengths[:, None]
    input_ids[~attention_mask] = 0
    groups = torch.arange(n) + 1000
    groups[3] = groups[7]  # two pairs of one group: they must not be each other's negatives
    return images, input_ids, attention_mask, groups


def make_student_teacher_queue(seed=0, queue_rows=12):
    """A float64 student, a teacher that differs from it, and a queue holding teacher features."""
    torch.manual_seed(seed)
    student = ImageTextModel(TINY).double()
    teacher = EMATeacher(student, momentum=0.9)
    with torch.no_grad():
        for p in teacher.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images, ids, mask, _ = make_batch(queue_rows, seed=seed + 1)
    image_queue, text_queue = FeatureQueue(20, TINY.embed_dim).double(), FeatureQueue(20, TINY.embed_dim).double()
    image_features, text_features = teacher(images, ids, mask)
    queue_groups = torch.arange(queue_rows) + 5000
    queue_groups[0] = 1000  # a stale copy of pair 0 in the queue: a false negative for it
    image_queue.enqueue(image_features, queue_groups)
    text_queue.enqueue(text_features, queue_groups)
    return student, teacher, image_queue, text_queue


def accumulated_msd_gradients(student, teacher, image_queue, text_queue, batch, K, alpha=0.4):
    """Gradients after the loop's K micro-batch backward passes of one window."""
    images, ids, mask, groups = batch
    B = len(groups) // K
    student.zero_grad(set_to_none=True)
    image_keys, text_keys = teacher(images, ids, mask)  # the teacher encodes the whole window first
    image_queue_rows, queue_groups = image_queue.contents()
    text_queue_rows, _ = text_queue.contents()
    for j in range(K):
        rows = slice(j * B, (j + 1) * B)
        image_queries, text_queries = student(images[rows], ids[rows], mask[rows])
        terms = msd_loss(image_queries, text_queries, image_keys[rows], text_keys[rows],
                         image_keys, text_keys, groups, image_queue_rows, text_queue_rows, queue_groups,
                         groups[rows], torch.arange(j * B, (j + 1) * B), student.logit_scale, alpha)
        (terms["loss"] / K).backward()
    return {name: p.grad.clone() for name, p in student.named_parameters()}


def accumulated_clip_gradients(student, batch, K):
    images, ids, mask, groups = batch
    B = len(groups) // K
    student.zero_grad(set_to_none=True)
    for j in range(K):
        rows = slice(j * B, (j + 1) * B)
        image_features, text_features = student(images[rows], ids[rows], mask[rows])
        (clip_loss(image_features, text_features, groups[rows], student.logit_scale)["loss"] / K).backward()
    return {name: p.grad.clone() for name, p in student.named_parameters()}


def test_accumulation_matches_one_large_batch():
    student, teacher, image_queue, text_queue = make_student_teacher_queue()
    batch = make_batch(16)
    one_batch = accumulated_msd_gradients(student, teacher, image_queue, text_queue, batch, K=1)
    four_micro = accumulated_msd_gradients(student, teacher, image_queue, text_queue, batch, K=4)
    assert one_batch.keys() == four_micro.keys()
    assert "logit_scale" in one_batch
    assert one_batch["logit_scale"].abs() > 1e-6  # the temperature really gets a gradient
    for name in one_batch:
        torch.testing.assert_close(four_micro[name], one_batch[name], rtol=1e-9, atol=1e-12, msg=name)


def test_naive_clip_accumulation_is_not_exact():
    torch.manual_seed(0)
    student = ImageTextModel(TINY).double()
    batch = make_batch(16)
    one_batch = accumulated_clip_gradients(student, batch, K=1)
    four_micro = accumulated_clip_gradients(student, batch, K=4)
    differences = [((four_micro[n] - one_batch[n]).norm() / one_batch[n].norm()).item() for n in one_batch]
    assert max(differences) > 0.05
    assert ((four_micro["logit_scale"] - one_batch["logit_scale"]).abs() > 1e-3).item()


def test_msd_loss_alpha_zero_is_infonce():
    student, teacher, image_queue, text_queue = make_student_teacher_queue()
    images, ids, mask, groups = make_batch(8)
    image_q, text_q = student(images, ids, mask)
    image_k, text_k = teacher(images, ids, mask)
    iq, qg = image_queue.contents()
    tq, _ = text_queue.contents()
    args = (image_q, text_q, image_k, text_k, image_k, text_k, groups, iq, tq, qg, groups, torch.arange(8),
            student.logit_scale)
    terms = msd_loss(*args, alpha=0.0)
    assert terms["kl"].item() > 0  # the term is computed, only not weighted
    torch.testing.assert_close(terms["loss"], terms["infonce"])

    # InfoNCE written out naively, row by row
    keys = torch.cat([text_k, tq])
    key_groups = torch.cat([groups, qg])
    scale = student.logit_scale.exp()
    total = 0.0
    for i in range(8):
        keep = [n for n in range(len(keys)) if n == i or key_groups[n] != groups[i]]
        logits = scale * (keys[keep] @ image_q[i])
        total += -(logits[keep.index(i)] - torch.logsumexp(logits, 0))
    torch.testing.assert_close(terms["infonce_i2t"], total / 8)


def test_kl_zero_when_teacher_is_student():
    torch.manual_seed(0)
    student = ImageTextModel(TINY).double()
    images, ids, mask, groups = make_batch(8)
    image_q, text_q = student(images, ids, mask)
    empty, no_groups = torch.zeros(0, TINY.embed_dim, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    terms = msd_loss(image_q, text_q, image_q.detach(), text_q.detach(), image_q.detach(), text_q.detach(),
                     groups, empty, empty, no_groups, groups, torch.arange(8), student.logit_scale, alpha=0.5)
    assert abs(terms["kl"].item()) < 1e-12


def test_false_negatives_masked_except_positive():
    query_groups = torch.tensor([7, 8])
    key_groups = torch.tensor([7, 8, 7, 9, 8])
    mask = false_negative_mask(query_groups, key_groups, positive_index=torch.tensor([0, 1]))
    assert mask.tolist() == [[False, False, True, False, False], [False, False, False, False, True]]


def test_false_negative_in_queue_is_ignored():
    """A queue key of the query's own group is neither a negative nor a target, whatever its features."""
    torch.manual_seed(0)
    normalize = torch.nn.functional.normalize
    query = normalize(torch.randn(1, 4), dim=1)
    target = normalize(torch.randn(1, 4), dim=1)
    keys = normalize(torch.randn(2, 4), dim=1)
    queue = normalize(torch.randn(3, 4), dim=1)
    scale = torch.tensor(math.log(10.0))

    def loss_with_first_queue_row(row, first_queue_group):
        queue_rows = torch.stack([row, queue[1], queue[2]])
        queue_groups = torch.tensor([first_queue_group, 5, 6])
        return msd_loss(query, query, target, target, keys, keys, torch.tensor([0, 1]), queue_rows, queue_rows,
                        queue_groups, torch.tensor([0]), torch.tensor([0]), scale, alpha=0.5)["loss"]

    # same group as the query: the row's features do not matter
    torch.testing.assert_close(loss_with_first_queue_row(queue[0], 0), loss_with_first_queue_row(-queue[0], 0))
    # another group: the same change does matter
    assert not torch.allclose(loss_with_first_queue_row(queue[0], 9), loss_with_first_queue_row(-queue[0], 9))


@pytest.mark.parametrize("temperature", [1e-4, 100.0])
def test_losses_finite_from_extreme_temperature(temperature):
    cfg = ModelConfig(**{**TINY.__dict__, "temperature": temperature})
    torch.manual_seed(0)
    student = ImageTextModel(cfg)
    images, ids, mask, groups = make_batch(8, dtype=torch.float32)
    no_queue, no_groups = torch.zeros(0, cfg.embed_dim), torch.zeros(0, dtype=torch.long)
    for method in ("clip", "msd"):
        image_f, text_f = student(images, ids, mask)
        if method == "clip":
            terms = clip_loss(image_f, text_f, groups, student.logit_scale)
        else:
            image_k, text_k = image_f.detach().flip(0), text_f.detach().flip(0)
            terms = msd_loss(image_f, text_f, image_k, text_k, image_k, text_k, groups, no_queue, no_queue,
                             no_groups, groups, torch.arange(8), student.logit_scale, alpha=0.5)
        terms["loss"].backward()
        assert torch.isfinite(terms["loss"]), method
        assert torch.isfinite(student.logit_scale.grad), method
        student.zero_grad()


# -----------------------------------------------------------------------------
# EMA teacher

def test_ema_matches_closed_form():
    torch.manual_seed(0)
    student = ImageTextModel(TINY)
    student.register_buffer("running_stat", torch.zeros(3))  # buffers are averaged too
    teacher = EMATeacher(student, momentum=0.9)
    start = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    targets = []
    for _ in range(3):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
            student.running_stat.add_(1.0)
        targets.append({k: v.clone() for k, v in student.state_dict().items()})
        teacher.update(student)
    assert teacher.updates.item() == 3
    for key, value in teacher.model.state_dict().items():
        expected = start[key]
        for target in targets:
            expected = 0.9 * expected + 0.1 * target[key]
        torch.testing.assert_close(value, expected, msg=key)
    assert teacher.model.running_stat.sum() > 0


def test_ema_warmup_momentum_rule():
    student = ImageTextModel(TINY)
    teacher = EMATeacher(student, momentum=0.995, warmup=True)
    momenta = []
    for _ in range(3):
        momenta.append(teacher.current_momentum())
        teacher.update(student)
    assert momenta == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    teacher.updates.fill_(10_000)
    assert teacher.current_momentum() == 0.995
    assert EMATeacher(student, momentum=0.995, warmup=False).current_momentum() == 0.995


def test_teacher_is_frozen_and_in_eval_mode():
    student = ImageTextModel(TINY)
    teacher = EMATeacher(student)
    teacher.train()
    assert not teacher.model.training
    assert all(not m.training for m in teacher.model.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="momentum"):
        EMATeacher(student, momentum=1.5)


# -----------------------------------------------------------------------------
# queues

def test_queue_keeps_newest_rows_in_order():
    queue = FeatureQueue(10, 1)
    row = 0
    for n in (4, 4, 3):
        queue.enqueue(torch.arange(row, row + n, dtype=torch.float32)[:, None], torch.arange(row, row + n))
        row += n
    features, groups = queue.ordered()
    assert features[:, 0].tolist() == list(range(1, 11))
    assert groups.tolist() == list(range(1, 11))
    assert queue.count.item() == 10
    assert queue.ptr.item() == 1


def test_queue_never_returns_unwritten_slots():
    queue = FeatureQueue(10, 2)
    assert queue.contents()[0].shape == (0, 2)
    queue.enqueue(torch.ones(3, 2), torch.arange(3))
    features, groups = queue.contents()
    assert features.shape == (3, 2)
    assert groups.tolist() == [0, 1, 2]


def test_queue_enqueue_larger_than_queue():
    queue = FeatureQueue(4, 1)
    queue.enqueue(torch.arange(11, dtype=torch.float32)[:, None], torch.arange(11))
    features, groups = queue.ordered()
    assert features[:, 0].tolist() == [7, 8, 9, 10]
    assert groups.tolist() == [7, 8, 9, 10]
    assert queue.count.item() == 4
