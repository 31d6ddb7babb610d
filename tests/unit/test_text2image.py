"""medmem.text2image on a tiny model: a 1-layer BERT, a 16x16 KL autoencoder, 3 iterations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medmem._errors import InputError
from medmem.generative import GenerativeConfig, GenerativeModel
from medmem.generative._networks import networks_for_sampling
from medmem.text2image import (
    MARKER_GROUP,
    MID_WINDOW,
    MITIGATIONS,
    Generation,
    Mitigation,
    Text2ImageConfig,
    TextEncoder,
    TextToImageModel,
    auroc_per_step,
    detection,
    detection_table,
    gap_gradient,
    generate,
    label_summary,
    marker_ablation,
    marker_attribution,
    marker_with_vs_without,
    mitigated_generate,
    plot_score_per_step,
    plot_step_auroc,
    pool_tokens,
    rank_prompts,
    token_significance,
    token_table,
    train_t2i,
    treat_markers,
    words_of,
)
from medmem.text2image._scores import mid_steps
from medmem.text2image._train import HighDFilter

WORDS = [
    "no",
    "acute",
    "disease",
    "heart",
    "size",
    "normal",
    "xx",
    "##xx",
    "pneumonia",
    "the",
    "is",
    "lungs",
    "clear",
    "left",
    "right",
    "opacity",
    ".",
    ",",
]
PROMPTS = [
    "heart size normal . lungs clear .",
    "no acute disease .",
    "left opacity , XXXX pneumonia .",
    "right XXXX opacity .",
]


def make_tiny_encoder(folder: Path) -> Path:
    """A random 1-layer BERT (hidden 16) with a word-level vocabulary, saved for AutoModel."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizer(str(vocab), do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_tiny_autoencoder(folder: Path) -> Path:
    cfg = GenerativeConfig.from_dict(
        {
            "model": "vae",
            "image_size": [16, 16],
            "data": {"source": "phantoms"},
            "autoencoder": {"channels": [8, 8], "latent_channels": 2, "norm_num_groups": 4},
        }
    )
    torch.manual_seed(0)
    GenerativeModel(cfg, networks_for_sampling(cfg)).save(folder)
    return folder


def make_pairs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, text in enumerate(PROMPTS):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(folder / f"{i}.png")
        rows += [{"path": f"{i}.png", "text": text}] * (3 if i == 0 else 1)  # pair 0 duplicated
    pd.DataFrame(rows).to_csv(folder / "pairs.csv", index=False)
    return folder / "pairs.csv"


def tiny_config(tmp: Path, **text: object) -> Text2ImageConfig:
    return Text2ImageConfig.from_dict(
        {
            "data": str(make_pairs(tmp / "data")),
            "autoencoder": str(make_tiny_autoencoder(tmp / "ae")),
            "diffusion": {
                "channels": [8, 8],
                "attention_levels": [False, True],
                "num_head_channels": 8,
                "norm_num_groups": 4,
                "num_train_timesteps": 20,
                "iterations": 3,
                "batch_size": 4,
            },
            "sampling": {"sampler": "ddim", "steps": 4},
            "text": {"encoder": str(make_tiny_encoder(tmp / "enc")), "max_length": 12, **text},
            "train": {"checkpoint_every": 1, "log_every": 1},
        }
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TextToImageModel:
    tmp = tmp_path_factory.mktemp("t2i")
    cfg = tiny_config(tmp)
    first = train_t2i(cfg, tmp / "run", stop_after=1, quiet=True)
    assert not first.finished and first.model is None
    result = train_t2i(cfg, tmp / "run", resume=True, quiet=True)
    assert result.finished
    assert len(pd.read_csv(tmp / "run" / "losses.csv")) == 3
    return TextToImageModel.load(tmp / "run")


def test_encoder_states_and_words(tiny: TextToImageModel) -> None:
    enc = tiny.encoder
    out = enc.encode(PROMPTS)
    assert out.states.shape == (4, 12, 16) and out.mask.shape == (4, 12)
    words = words_of(enc.tokens(out.ids[2]), special=set(enc.tokenizer.all_special_tokens))
    assert [w for w, _, _ in words] == ["left", "opacity", ",", "xxxx", "pneumonia", "."]
    assert words[3][2] == [4, 5]  # "xx" + "##xx"


def test_attention_control_reproduces_monai(tiny: TextToImageModel) -> None:
    z = torch.randn(2, *tiny.latent_shape)
    t = torch.tensor([3, 10])
    ctx = tiny.encode_prompts(PROMPTS[:2]).states
    with torch.no_grad():
        ours = tiny.eps(z, t, ctx)
        monai = tiny.unet(z, timesteps=t, context=ctx)
    torch.testing.assert_close(ours, monai, rtol=1e-5, atol=1e-6)


def test_generate_scores_have_right_shapes(tiny: TextToImageModel) -> None:
    cond = tiny.encode_prompts(PROMPTS)
    gen = generate(tiny, cond, n_per_prompt=2, seed=1, batch_size=3, quiet=True)
    assert gen.images.shape == (4, 2, 1, 16, 16)
    assert gen.d.shape == gen.entropy.shape == (4, 2, 4)
    assert torch.isfinite(gen.d).all() and (gen.entropy > 0).all()
    assert (gen.entropy <= np.log(12) + 1e-5).all()
    scores = gen.scores()
    assert set(scores) == {"d_first", "d_mean", "d_mid", "entropy_first"}
    mid = mid_steps(gen.timesteps, gen.num_train_timesteps)
    np.testing.assert_allclose(scores["d_mid"], gen.d[:, :, mid].mean((1, 2)).numpy())
    assert all(v.shape == (4,) for v in scores.values())
    again = generate(tiny, cond, n_per_prompt=2, seed=1, batch_size=8, quiet=True)
    torch.testing.assert_close(gen.d, again.d)  # batching does not change the scores
    ranked = rank_prompts(PROMPTS, scores, duplicated=[True, False, False, False])
    assert list(ranked["rank"]) == [1, 2, 3, 4]
    assert ranked["d_first"].is_monotonic_decreasing
    assert ranked.set_index("prompt_id").loc[2, "n_markers"] == 1


def test_attribution_gradient_matches_finite_differences(tiny: TextToImageModel) -> None:
    unet = tiny.unet.double()
    try:
        tiny.empty.states = tiny.empty.states.double()
        h = tiny.encode_prompts(PROMPTS[2:3]).states[0].double()
        z = torch.randn(2, *tiny.latent_shape, dtype=torch.float64)
        t = torch.tensor([15, 5])
        d, grad = gap_gradient(tiny, z, t, h)
        assert grad.shape == (2, *h.shape)
        rng = np.random.default_rng(0)
        for s in range(2):
            for i, j in zip(rng.integers(0, 12, 4), rng.integers(0, 16, 4), strict=True):
                e = 1e-6
                hp, hm = h.clone(), h.clone()
                hp[i, j] += e
                hm[i, j] -= e
                fd = (
                    gap_gradient(tiny, z[s : s + 1], t[s : s + 1], hp)[0]
                    - gap_gradient(tiny, z[s : s + 1], t[s : s + 1], hm)[0]
                ) / (2 * e)
                assert float(fd) == pytest.approx(float(grad[s, i, j]), rel=1e-5, abs=1e-8)
    finally:
        unet.float()
        tiny.empty.states = tiny.empty.states.float()


def test_token_significance_tables(tiny: TextToImageModel) -> None:
    cond = tiny.encode_prompts(PROMPTS)
    gen = generate(tiny, cond, n_per_prompt=1, keep_latents=True, quiet=True)
    assert gen.latents is not None and gen.latents.shape == (4, 1, 4, *tiny.latent_shape)
    sig = token_significance(tiny, gen, cond, quiet=True)
    assert sig.shape == (4, 12) and (sig >= 0).all()
    table = token_table(tiny.encoder, cond, sig)
    assert not table["word"].isin(["[CLS]", "[SEP]", "[PAD]"]).any()
    assert table.groupby("prompt_id")["share"].sum().round(6).eq(1).all()
    pooled = pool_tokens(table, min_prompts=2)
    assert MARKER_GROUP in set(pooled["word"])  # "xxxx" in prompts 2 and 3, pooled as a group
    with pytest.raises(InputError, match="keep_latents"):
        token_significance(tiny, generate(tiny, cond, n_per_prompt=1, quiet=True), cond)


@pytest.mark.parametrize("kind", [k for k in MITIGATIONS if k != "none"])
def test_each_mitigation_runs_and_changes_the_output(tiny: TextToImageModel, kind: str) -> None:
    base = mitigated_generate(tiny, PROMPTS[2:], Mitigation(), n_per_prompt=1, quiet=True)
    out = mitigated_generate(tiny, PROMPTS[2:], Mitigation(kind), n_per_prompt=1, quiet=True)
    assert out.images.shape == base.images.shape
    assert not torch.allclose(out.images, base.images)
    assert not torch.allclose(out.d, base.d)


def test_text_mitigations_and_marker_treatments() -> None:
    vocab = ["alpha", "beta"]
    text = "left XXXX opacity"
    assert len(Mitigation("random_tokens", 2).texts([text], vocab)[0].split()) == 5
    assert Mitigation("random_tokens", 2).texts([text], vocab) == Mitigation(
        "random_tokens", 2
    ).texts([text], vocab)
    assert treat_markers(text, "remove") == "left opacity"
    assert treat_markers(text, "neutral", neutral="unspecified") == "left unspecified opacity"
    import random

    assert treat_markers(text, "random", rng=random.Random(0), vocab=vocab).split()[1] in vocab
    with pytest.raises(InputError, match="mitigation"):
        Mitigation("nope")


def test_detection_convention() -> None:
    pos = np.array([5.0, 4.0, 1.0])
    neg = np.arange(100, dtype=float) / 100  # max 0.99, 2nd highest 0.98
    out = detection(pos, neg)
    assert out["auroc"] == pytest.approx((2 * 100 + 100) / 300)
    assert out["threshold"] == pytest.approx(0.98)  # k = floor(0.01 * 100) = 1
    assert out["tpr_at_1pct_fpr"] == pytest.approx(1.0)
    with pytest.raises(InputError, match="positive"):
        detection(np.array([]), neg)


def test_markers_training_fix_trains(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, markers="random", caption_replacement=0.5)
    result = train_t2i(
        cfg.replace(diffusion=cfg.diffusion.replace(iterations=2)), tmp_path / "run", quiet=True
    )
    assert result.finished and (tmp_path / "run" / "model" / "unet.safetensors").is_file()


def test_mid_steps_follow_the_window() -> None:
    ddim25 = list(range(999, -1, -41))[:25]  # 999, 958, ..., 15
    idx = mid_steps(ddim25, 1000)
    assert idx and all(MID_WINDOW[0] <= ddim25[i] / 1000 <= MID_WINDOW[1] for i in idx)
    assert mid_steps([20, 14, 0], 20) == [1]  # none inside: the closest step (0.7)


def test_high_d_filter_drops_above_the_running_median_of_its_timestep() -> None:
    f = HighDFilter(2.0, 100)
    low = torch.full((40,), 1.0)
    keep = f.keep(low, torch.full((40,), 5), conditioned=torch.ones(40, dtype=bool), active=True)
    assert keep.all()  # the bin's median is not trusted before 32 values
    d = torch.tensor([3.0, 1.5, 3.0, 100.0])
    t = torch.tensor([5, 5, 95, 5])
    cond = torch.tensor([True, True, True, False])
    keep = f.keep(d, t, conditioned=cond, active=True)
    assert keep.tolist() == [False, True, True, True]  # other bin empty; unconditioned kept
    f.count(torch.tensor([0, 1, 1, 2]), keep, n_rows=3)
    assert f.seen == [1, 2, 1] and f.dropped == [1, 0, 0]
    assert len(f.history[0]) == 42 and len(f.history[9]) == 1


def test_drop_high_d_training_drops_samples_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(HighDFilter, "min_history", 1)
    cfg = tiny_config(tmp_path, caption_dropout=0.0, caption_replacement=0.25)
    cfg = cfg.replace(
        diffusion=cfg.diffusion.replace(iterations=8),
        train=cfg.train.replace(drop_high_d=1.0, drop_warmup=2),
    )
    whole = train_t2i(cfg, tmp_path / "whole", quiet=True)
    train_t2i(cfg, tmp_path / "split", stop_after=5, quiet=True)
    split = train_t2i(cfg, tmp_path / "split", resume=True, quiet=True)
    drops = pd.read_csv(tmp_path / "whole" / "drops.csv")
    assert drops["seen"].sum() == 8 * 4 and drops["dropped"].sum() > 0
    losses = pd.read_csv(tmp_path / "whole" / "losses.csv")
    assert (losses.loc[losses["iteration"] <= 2, "dropped"] == 0).all()  # warm-up
    assert losses["dropped"].max() > 0
    pd.testing.assert_frame_equal(drops, pd.read_csv(tmp_path / "split" / "drops.csv"))
    for k, v in whole.model.unet.state_dict().items():
        torch.testing.assert_close(v, split.model.unet.state_dict()[k])


def test_default_encoder_is_bundled_minilm() -> None:
    enc = TextEncoder(max_length=16)
    out = enc.encode(["Heart size XXXX. No pneumonia."])
    assert enc.dim == 384 and out.states.shape == (1, 16, 384)
    assert "xx" in enc.tokens(out.ids[0])


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"train": {"drop_high_d": 0.5}}, "0 \\(off\\) or a factor"),
        ({"text": {"caption_replacement": 1.5}}, "caption_replacement"),
        ({"train": {"drop_hi_d": 2}}, "Did you mean 'drop_high_d'"),
    ],
)
def test_training_mitigation_settings_are_validated(section: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        Text2ImageConfig.from_dict(section, "config")


def test_audit_mitigations_counts_copies_of_training_images(
    tiny: TextToImageModel, tmp_path: Path, pixel_detector: object
) -> None:
    from medmem.data import load_dataset
    from medmem.text2image import audit_mitigations

    pairs = make_pairs(tmp_path / "data")
    rng = np.random.default_rng(1)
    for i in range(40):
        img = rng.integers(0, 255, (16, 16), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / "data" / f"val{i}.png")
    data = tmp_path / "data"
    train = load_dataset([data / f"{i}.png" for i in range(4)], image_size=(16, 16), quiet=True)
    val = load_dataset([data / f"val{i}.png" for i in range(40)], image_size=(16, 16), quiet=True)
    captions = pd.read_csv(pairs).assign(
        path=lambda f: [str(tmp_path / "data" / p) for p in f["path"]],
        finding=["a", "a", "a", "b", "b", "b"],
    )
    prompts = pd.DataFrame(
        {
            "text": PROMPTS,
            "path": [str(tmp_path / "data" / f"{i}.png") for i in range(4)],
            "memorized": [True, False, False, False],
            "finding": ["a", "a", "b", "b"],
        }
    )
    frame = audit_mitigations(
        tiny,
        prompts,
        train,
        val,
        pixel_detector,
        tmp_path / "mit",
        captions=captions,
        kinds=["random_tokens"],
        n_per_prompt=2,
        percentile=80,
        n_bootstrap=10,
        n_controls=0,
        fid=False,
        quiet=True,
    )
    assert list(frame["mitigation"]) == ["none", "random_tokens(4)"]
    for col in ("copies_memorized", "own_copies_other", "caption_cosine", "finding_agreement"):
        assert (
            frame[col].between(0, 1).all() if col != "caption_cosine" else frame[col].notna().all()
        )
    assert (frame["n_images"] == 8).all() and frame["auroc_d_first"].notna().all()
    assert (tmp_path / "mit" / "mitigations.csv").is_file()
    assert (tmp_path / "mit" / "mitigation-none-images.safetensors").is_file()


def test_copy_judge_flags_an_exact_copy_as_its_own_copy(
    tmp_path: Path, pixel_detector: object
) -> None:
    from medmem.data import load_dataset
    from medmem.text2image import CopyJudge

    rng = np.random.default_rng(2)
    files = []
    for i in range(44):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(files[-1])
    train = load_dataset(files[:4], image_size=(16, 16), quiet=True)
    val = load_dataset(files[4:], image_size=(16, 16), quiet=True)
    prompts = pd.DataFrame({"text": ["a", "b"], "path": [str(files[1]), str(files[2])]})
    judge = CopyJudge(
        train, val, pixel_detector, prompts, percentile=80, n_bootstrap=10, n_controls=0,
        fid=False, score="embedding",  # noise images: the pixels' own correlation
    )  # fmt: skip
    copy_of_1 = torch.as_tensor(np.asarray(train[1]), dtype=torch.float32)
    noise = torch.rand(1, 1, *copy_of_1.shape)
    images = torch.stack([copy_of_1[None], copy_of_1[None]])  # prompt "b" copies 1, not 2
    images = torch.cat([images[:, :1], noise.expand(2, 1, *copy_of_1.shape)], dim=1)
    flags = judge.flags(images, prompts["path"].tolist())
    assert flags.copy.tolist() == [True, False, True, False]
    assert flags.own_copy.tolist() == [True, False, False, False]
    assert flags.nearest[0] == str(files[1].resolve())


def test_resume_refuses_other_settings_naming_them(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    train_t2i(cfg, tmp_path / "run", stop_after=1, quiet=True)
    other = cfg.replace(train=cfg.train.replace(seed=1))
    with pytest.raises(InputError, match=r"other settings \(train\.seed: 0 saved vs 1 now\)"):
        train_t2i(other, tmp_path / "run", resume=True, quiet=True)


def test_generation_saves_and_loads(tiny: TextToImageModel, tmp_path: Path) -> None:
    gen = generate(tiny, tiny.encode_prompts(PROMPTS[:2]), n_per_prompt=2, seed=1, quiet=True)
    path = gen.save(tmp_path / "scores.safetensors", seconds=1.5)
    back, meta = Generation.load(path)
    assert meta["seconds"] == 1.5 and back.timesteps == gen.timesteps
    assert back.num_train_timesteps == gen.num_train_timesteps
    for name in ("images", "d", "entropy"):
        assert torch.equal(getattr(back, name), getattr(gen, name))
    np.testing.assert_array_equal(back.scores()["d_mid"], gen.scores()["d_mid"])


def _study_prompts() -> pd.DataFrame:
    """Two duplicated prompts that score high, two single and two unseen that score low;
    one prompt per group carries a marker."""
    return pd.DataFrame(
        {
            "group": ["duplicated"] * 2 + ["single"] * 2 + ["unseen"] * 2,
            "d_first": [5.0, 4.0, 1.0, 2.0, 3.0, 0.5],
            "entropy_first": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            "n_markers": [1, 0, 0, 1, 2, 0],
        }
    )


def test_detection_table_and_auroc_per_step_by_group() -> None:
    prompts = _study_prompts()
    table = detection_table(prompts)
    assert list(table)[:2] == [
        "d_first | duplicated vs single",
        "entropy_first | duplicated vs single",
    ]
    assert table["d_first | duplicated vs single"]["auroc"] == 1.0
    assert table["d_first | duplicated vs single+unseen"]["auroc"] == 1.0
    assert table["entropy_first | duplicated vs unseen"]["auroc"] == 0.5  # all tied
    # (P, G, S): step 0 separates the groups, step 1 reverses them
    d = torch.tensor(
        [[[5.0, 0.0]], [[4.0, 0.0]], [[1.0, 3.0]], [[2.0, 3.0]], [[0.0, 3.0]], [[0.5, 3.0]]]
    )
    per_step = auroc_per_step(d, prompts["group"].to_numpy())
    assert per_step == {"single": [1.0, 0.0], "unseen": [1.0, 0.0]}
    assert auroc_per_step(d.mean(1).numpy(), prompts["group"]) == per_step


def test_marker_summaries() -> None:
    prompts = _study_prompts()
    wv = marker_with_vs_without(prompts)
    assert list(wv) == ["duplicated", "single", "unseen"]
    assert wv["duplicated"] == {
        "n_with": 1,
        "n_without": 1,
        "d_first_with": 5.0,
        "d_first_without": 4.0,
        "auroc_with_vs_without_d_first": 1.0,
    }
    tokens = pd.DataFrame(
        {
            "prompt_id": [0, 0, 1, 1, 2, 2],
            "group": ["duplicated"] * 4 + ["single"] * 2,
            "rank": [1, 2, 1, 2, 1, 2],
            "share": [0.75, 0.25, 0.5, 0.5, 0.9, 0.1],
            "is_marker": [True, False, False, False, False, True],
        }
    )
    att = marker_attribution(tokens)
    assert att["duplicated"] == {
        "n_prompts_with_markers": 1,
        "mean_significance_share_of_markers": 0.75,
        "mean_share_of_words_that_are_markers": 0.5,
        "prompts_with_a_marker_ranked_first": 1,
    }
    assert att["single"]["prompts_with_a_marker_ranked_first"] == 0
    ablations = pd.DataFrame(
        {
            "prompt": [0, 4, 0, 4],
            "group": ["duplicated", "unseen"] * 2,
            "ablation": ["keep", "keep", "remove", "remove"],
            "d_first": [4.0, 2.0, 2.0, 3.0],
            "d_mean": [1.0, 1.0, 1.0, 1.0],
        }
    )
    means, paired = marker_ablation(ablations)
    assert len(means) == 4 and set(means[0]) == {"group", "ablation", "d_first", "d_mean"}
    assert paired == {
        "remove | duplicated": {"n": 1, "mean_relative_change_d_first": -0.5},
        "remove | unseen": {"n": 1, "mean_relative_change_d_first": 0.5},
    }


def test_label_summary_counts_own_copies() -> None:
    labels = pd.DataFrame(
        {
            "group": ["duplicated", "duplicated", "single", "single"],
            "own_copies": [2, 1, 0, 1],
            "n_generations": [4, 4, 4, 4],
            "d_first": [3.0, 2.0, 0.5, 1.0],
        }
    )
    s = label_summary(labels)
    assert (s["n_memorized"], s["n_not_memorized"]) == (3, 1)
    assert s["memorized_by_group"] == {"duplicated": 1.0, "single": 0.5}
    assert s["own_copy_rate_by_group"] == {"duplicated": 3 / 8, "single": 1 / 8}
    assert s["detection"]["d_first"]["auroc"] == 1.0
    assert label_summary(labels.assign(own_copies=1))["detection"] is None


def test_step_plots_are_written(tmp_path: Path) -> None:
    prompts = _study_prompts()
    d = np.arange(12, dtype=float).reshape(6, 1, 2)
    path = plot_score_per_step(d, prompts["group"], [999, 500], tmp_path / "steps.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    per_step = {"timesteps": [999, 500], "original": auroc_per_step(d, prompts["group"])}
    path = plot_step_auroc(per_step, tmp_path / "auroc.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
