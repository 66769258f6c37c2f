"""Encoders and retrieval metrics against hand-made cases."""

import torch

from evaluate import ranks_of_first_match, retrieval_metrics
from model import ImageTextModel, ModelConfig

TINY = ModelConfig(image_size=16, patch_size=8, vision_width=32, vision_depth=2, vision_heads=2,
                   vocab_size=50, max_len=12, text_width=32, text_depth=2, text_heads=2, embed_dim=16,
                   dropout=0.1)


def test_padded_text_encodes_like_unpadded():
    torch.manual_seed(0)
    model = ImageTextModel(TINY).eval()
    ids = torch.tensor([[2, 11, 12, 13, 3]])
    padded = torch.cat([ids, torch.zeros(1, 7, dtype=torch.long)], dim=1)
    mask_padded = padded != 0
    short = model.encode_text(ids, torch.ones_like(ids, dtype=torch.bool))
    long = model.encode_text(padded, mask_padded)
    torch.testing.assert_close(long, short, rtol=1e-5, atol=1e-6)
    # garbage in the padded positions changes nothing either
    noisy = padded.clone()
    noisy[0, 5:] = 17
    torch.testing.assert_close(model.encode_text(noisy, mask_padded), short, rtol=1e-5, atol=1e-6)


def test_model_outputs_unit_vectors():
    model = ImageTextModel(TINY).eval()
    images = torch.randn(3, 1, 16, 16)
    ids = torch.randint(4, 50, (3, 12))
    image_f, text_f = model(images, ids, torch.ones_like(ids, dtype=torch.bool))
    assert image_f.shape == text_f.shape == (3, 16)
    torch.testing.assert_close(image_f.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(text_f.norm(dim=1), torch.ones(3))


def test_rgb_model_accepts_three_channels():
    model = ImageTextModel(ModelConfig(**{**TINY.__dict__, "channels": 3})).eval()
    assert model.encode_image(torch.randn(2, 3, 16, 16)).shape == (2, 16)


def test_temperature_clamped():
    model = ImageTextModel(TINY)
    with torch.no_grad():
        model.logit_scale.fill_(20.0)  # temperature 2e-9
    model.clamp_temperature(0.01, 0.5)
    assert abs(model.temperature.item() - 0.01) < 1e-6
    with torch.no_grad():
        model.logit_scale.fill_(-5.0)  # temperature 148
    model.clamp_temperature(0.01, 0.5)
    assert abs(model.temperature.item() - 0.5) < 1e-6


def test_recall_with_repeated_texts_hand_counted():
    # 4 pairs; texts 1 and 2 are the same report, so they share group 7.
    groups = torch.tensor([5, 7, 7, 9])
    similarity = torch.tensor([  # rows: images, columns: texts
        [0.1, 0.9, 0.2, 0.3],    # image 0: own text ranks 4th (behind 0.9, 0.3, 0.2)
        [0.0, 0.1, 0.8, 0.2],    # image 1: text 2 is a correct match: rank 1
        [0.5, 0.1, 0.2, 0.4],    # image 2: best correct 0.2, behind 0.5 and 0.4: rank 3
        [0.1, 0.2, 0.3, 0.3],    # image 3: tie with wrong text 2 counts against it: rank 2
    ])
    i2t = ranks_of_first_match(similarity, groups, groups)
    assert i2t.tolist() == [4, 1, 3, 2]
    # text -> image reads the columns
    t2i = ranks_of_first_match(similarity.T, groups, groups)
    # text 0 column [0.1, 0.0, 0.5, 0.1]: own 0.1, ahead: 0.5 and the tie 0.1 -> rank 3
    # text 1 column [0.9, 0.1, 0.1, 0.2]: correct images 1, 2 (0.1); ahead: 0.9, 0.2 -> rank 3
    # text 2 column [0.2, 0.8, 0.2, 0.3]: correct best 0.8 -> rank 1
    # text 3 column [0.3, 0.2, 0.4, 0.3]: own 0.3; ahead: 0.4 and the tie 0.3 -> rank 3
    assert t2i.tolist() == [3, 3, 1, 3]
    scores = retrieval_metrics(similarity, groups)
    assert scores["i2t_R@1"] == 25.0
    assert scores["i2t_R@5"] == 100.0
    assert scores["t2i_R@1"] == 25.0
    assert scores["i2t_median_rank"] == 2.0  # torch.median takes the lower of the two middle values
    assert scores["t2i_median_rank"] == 3.0


def test_recall_of_constant_scores_is_worst():
    groups = torch.arange(5)
    scores = retrieval_metrics(torch.zeros(5, 5), groups)
    assert scores["i2t_R@1"] == 0.0
    assert scores["i2t_median_rank"] == 5.0
