"""The IMDb sentiment experiment (minialign.experiments.imdb.reader, minialign.algorithms.classifier, minialign.experiments): the aclImdb reader on a
tiny fixture in both layouts (folder, .tar.gz), prefix sampling, the classifier's evaluation on a separable toy set,
the sequence-level KL estimator against brute force on a tiny model, the classifier:PATH reward term, and the whole
experiment's plumbing on a very reduced configuration. The real run (the shared aclImdb copy) is not part of the
suite; see minialign/experiments/reader.py."""

import dataclasses
import io
import json
import math
import random
import tarfile

import pytest
import torch
from conftest import DigitTok, tiny_model

from minialign.algorithms import classifier, reward_funcs
from minialign.errors import UserError
from minialign.evaluation import degeneracy
from minialign.evaluation.evaluate import sample_and_score, summarize, text_judge
from minialign.experiments.imdb import naive_bayes, reader
from minialign.experiments.imdb import run as experiment
from minialign.models import decoder

GOOD = "wonderful great superb moving brilliant loved beautiful best".split()
BAD = "awful boring terrible waste worst dull poor hated".split()
NEUTRAL = "the film movie story actor plot scene and it was a with this that of".split()


def review_text(rng: random.Random, positive: bool) -> str:
    """A synthetic review: neutral words with a few sentiment words of one side, sentences and an HTML break."""
    side = GOOD if positive else BAD
    sentences = []
    for _ in range(rng.randint(3, 5)):
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(6, 10))]
        for _ in range(2):
            words.insert(rng.randrange(len(words)), rng.choice(side))
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences[:2]) + "<br /><br />" + " ".join(sentences[2:])


def write_fixture(root, n_per_folder: int = 6, seed: int = 0) -> dict:
    """aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt under root (plus unsup/ and a urls file, to be ignored);
    returns {(split, label): [texts in id order]}."""
    rng = random.Random(seed)
    expected = {}
    for split in ("train", "test"):
        for folder, label in (("pos", 1), ("neg", 0)):
            d = root / "aclImdb" / split / folder
            d.mkdir(parents=True)
            texts = []
            for i in range(n_per_folder):
                text = review_text(rng, label == 1)
                rating = rng.randint(7, 10) if label else rng.randint(1, 4)
                (d / f"{i}_{rating}.txt").write_text(text, encoding="utf-8")
                texts.append(reader.clean_review(text))
            expected[split, label] = texts
        (root / "aclImdb" / split / f"urls_{split}.txt").write_text("http://example.com\n")
    (root / "aclImdb" / "train" / "unsup").mkdir()
    (root / "aclImdb" / "train" / "unsup" / "0_0.txt").write_text("unlabeled")
    return expected


def make_tar(root, name="aclImdb_v1.tar.gz"):
    path = root / name
    with tarfile.open(path, "w:gz") as tf:
        tf.add(root / "aclImdb", arcname="aclImdb")
    return path


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imdb")
    expected = write_fixture(root)
    return root, expected, make_tar(root)


# ------------------------------------------------------------------------------------------------ reader

def test_reader_labels_from_file_names_in_folder_and_tar(fixture_dir):
    root, expected, tar = fixture_dir
    for source in (root / "aclImdb", root, tar):  # the aclImdb folder, a folder holding it, the archive
        data = reader.read_imdb(source)
        assert sorted(data) == ["test", "train"]
        for split, reviews in data.items():
            assert [r.split for r in reviews] == [split] * 12  # unsup/ and urls_*.txt ignored
            assert [r.label for r in reviews] == [0] * 6 + [1] * 6  # sorted by (label, id), whatever the disk order
            assert [r.text for r in reviews] == expected[split, 0] + expected[split, 1]
            assert all((7 <= r.rating <= 10) if r.label else (1 <= r.rating <= 4) for r in reviews)
            assert all("<br" not in r.text and "  " not in r.text for r in reviews)
    assert [r.id for r in reader.read_imdb(tar, splits=("test",))["test"]] == list(range(6)) * 2


def test_reader_errors_name_the_file(tmp_path):
    d = tmp_path / "aclImdb" / "train" / "pos"
    d.mkdir(parents=True)
    (tmp_path / "aclImdb" / "test" / "neg").mkdir(parents=True)
    (tmp_path / "aclImdb" / "test" / "neg" / "1_2.txt").write_text("bad film")
    (d / "3_2.txt").write_text("a rating of 2 under pos/")
    with pytest.raises(ValueError, match=r"3_2.txt: rating 2 contradicts the folder pos/"):
        reader.read_imdb(tmp_path)
    (d / "3_2.txt").unlink()
    (d / "review.txt").write_text("no rating in the name")
    with pytest.raises(ValueError, match=r"review.txt: file name must be <id>_<rating>.txt"):
        reader.read_imdb(tmp_path)
    (d / "review.txt").unlink()
    (d / "4_8.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match=r"4_8.txt: not UTF-8"):
        reader.read_imdb(tmp_path)
    (d / "4_8.txt").write_text("fine")
    with pytest.raises(ValueError, match="no labeled reviews in train/pos or train/neg") as e:
        reader.read_imdb(tmp_path / "aclImdb" / "test")
    assert "aclImdb/train" in str(e.value)
    truncated = tmp_path / "cut.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(tmp_path / "aclImdb", arcname="aclImdb")
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match=r"cut.tar.gz: corrupt or truncated archive"):
        reader.read_imdb(truncated)
    with pytest.raises(FileNotFoundError):
        reader.read_imdb(tmp_path / "missing.tar.gz")


# ---------------------------------------------------------------------------------------------- prefixes

def test_prefixes_are_token_prefixes_and_continuations_are_cut(fixture_dir, tok):
    reviews = reader.read_imdb(fixture_dir[0])["train"]
    text = reviews[0].text
    prefix, rest = reader.split_prefix(text, tok, 3)
    assert prefix + rest == text and prefix == tok.decode(tok.encode(text)[:3])
    assert reader.split_prefix("hi", tok, 8) is None  # too short to leave a continuation
    cont = reader.cut_continuation(rest, tok, 12)
    assert rest.startswith(cont) and len(tok.encode(cont)) <= 12 and cont == cont.strip()
    assert reader.cut_continuation("Short one.", tok, 50) == "Short one."
    # a sentence end late enough is preferred to a word boundary: "Aaa bbb. Ccc" cut inside Ccc ends at "bbb."
    long = "The film was good. " + "and " * 40
    assert reader.cut_continuation(long, tok, len(tok.encode("The film was good. and and"))) == "The film was good."
    picked = reader.sample_prefixes(reviews, tok, seed=5, continuation_tokens=10)
    assert len(picked) == len(reviews)  # every fixture review is long enough
    lengths = set()
    for p in picked:  # the first k tokens of the review, 2 <= k <= 8, then the start of the rest
        ids = tok.encode(p.review.text)
        (k,) = [k for k in range(2, 9) if tok.decode(ids[:k]) == p.prefix]
        lengths.add(k)
        assert p.review.text.startswith(p.prefix + p.continuation) and p.continuation
    again = reader.sample_prefixes(reviews, tok, seed=5, continuation_tokens=10)
    assert [(p.prefix, p.continuation) for p in again] == [(p.prefix, p.continuation) for p in picked]
    assert len(lengths) >= 4  # uniform in [2, 8]: a dozen reviews see several lengths
    assert len(reader.sample_prefixes(reviews, tok, seed=5, n=4)) == 4


# -------------------------------------------------------------------------------------------- classifier

def test_classifier_separates_a_toy_set_and_round_trips(tmp_path):
    rng = random.Random(0)
    texts = [review_text(rng, i % 2 == 0) for i in range(200)]
    labels = [int(i % 2 == 0) for i in range(200)]
    clf = classifier.train_classifier(texts[:100], labels[:100], num_buckets=2**16, steps=40)
    res = classifier.evaluate_classifier(clf, texts[100:], labels[100:])
    assert res["accuracy"] == 1.0 and res["n"] == 100 and res["log_loss"] < 0.5
    # accuracy by hand on a fixed classifier: P > 0.5 counts as positive
    with torch.no_grad():
        clf.weight.zero_()
        clf.bias.fill_(1.0)  # everything positive
    assert classifier.evaluate_classifier(clf, texts[:4], [1, 0, 0, 0])["accuracy"] == 0.25
    # features: distinct uni- and bigrams, L2-normalized; no words -> the zero vector
    X = classifier.features(["good good film", ""], 2**12)
    assert X.rows.tolist() == [0] * 4  # good, film, "good good", "good film"
    assert X.values.tolist() == pytest.approx([0.5] * 4)
    assert classifier.words("Didn't LIKE it!") == ["didn't", "like", "it", "!"]
    path = tmp_path / "clf.pt"
    classifier.save_classifier(clf, path, {"accuracy": 0.25})
    assert torch.equal(classifier.load_classifier(path).predict_proba(texts[:3]), clf.predict_proba(texts[:3]))
    (tmp_path / "bad.pt").write_text("not a classifier")
    with pytest.raises(ValueError, match="bad.pt: not a sentiment classifier"):
        classifier.load_classifier(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        classifier.train_classifier(["a"], [2])


def test_second_judge_naive_bayes_separates_a_toy_set_and_round_trips(tmp_path):
    pos = ["a great film, wonderful acting", "great fun and wonderful", "loved it, great", "wonderful, great story"]
    neg = ["an awful film, terrible acting", "awful and boring", "terrible, hated it", "boring awful story"]
    texts, labels = (pos + neg) * 5, ([1] * 4 + [0] * 4) * 5
    nb = naive_bayes.train_naive_bayes(texts, labels, min_count=1)
    # log P(w|+) - log P(w|-) > 0 for a positive word, < 0 for a negative one, 0-ish for "film" (in both once)
    assert nb.weights["great"] > 0 > nb.weights["awful"]
    p = nb.predict_proba(["great wonderful", "awful terrible"])
    assert p[0] > 0.5 > p[1]
    assert naive_bayes.evaluate_naive_bayes(nb, pos + neg, [1] * 4 + [0] * 4)["accuracy"] == 1.0
    assert nb.score(["a great"], [" film"]) == pytest.approx(nb.predict_proba(["a great film"]).tolist())
    naive_bayes.save_naive_bayes(nb, tmp_path / "nb.json")
    again = naive_bayes.load_naive_bayes(tmp_path / "nb.json")
    assert torch.equal(again.predict_proba(pos + neg), nb.predict_proba(pos + neg))
    (tmp_path / "bad.json").write_text('{"kind": "other"}')
    with pytest.raises(ValueError, match="not a naive Bayes judge file"):
        naive_bayes.load_naive_bayes(tmp_path / "bad.json")


def test_degeneracy_hand_computed():
    # "the best of the best of the best": 8 words, 3-grams: the-best-of, best-of-the, of-the-best, the-best-of (rep),
    # best-of-the (rep), of-the-best (rep) -> 3 of 6 repeat: 0.5. "a fine film": 1 3-gram, none repeats: 0.
    texts = ["the best of the best of the best", "a fine film"]
    d = degeneracy.degeneracy(texts)
    assert d["repeat_3"] == pytest.approx((0.5 + 0.0) / 2)
    # words: 8 + 3 = 11, unique: the best of a fine film = 6 -> 6/11; bigrams: 7 + 2 = 9, unique: the-best best-of
    # of-the a-fine fine-film = 5 -> 5/9
    assert d["distinct_1"] == pytest.approx(6 / 11) and d["distinct_2"] == pytest.approx(5 / 9)
    assert degeneracy.degeneracy(["", "one"]) == {"distinct_1": 1.0, "distinct_2": 0.0, "repeat_3": 0.0}


def test_classifier_reward_term_scores_prompt_plus_completion(tmp_path):
    rng = random.Random(1)
    texts = [review_text(rng, i % 2 == 0) for i in range(100)]
    clf = classifier.train_classifier(texts, [int(i % 2 == 0) for i in range(100)], num_buckets=2**12, steps=40)
    path = tmp_path / "clf.pt"
    classifier.save_classifier(clf, path)
    (src,) = reward_funcs.parse_reward_funcs([f"classifier:{path}"], [])
    assert src.name == f"classifier:{path}" and src.weight == 1.0 and reward_funcs.required_fields(src.fn) == []
    prompts, completions = ["The movie was", "The movie was"], [" wonderful and brilliant", " awful and boring"]
    rewards = reward_funcs.compute_rewards([src], prompts, completions, {"finished": [True, True]})[src.name]
    expected = clf.predict_proba(["The movie was wonderful and brilliant", "The movie was awful and boring"])
    assert rewards == pytest.approx(expected.tolist()) and rewards[0] > 0.5 > rewards[1]
    assert reward_funcs.parse_reward_funcs([f"classifier:{path}"], [])[0].fn is not src.fn  # a closure per parse...
    assert len([k for k in reward_funcs._CLASSIFIERS if k.endswith("clf.pt")]) == 1  # ...over one cached model
    with pytest.raises(ValueError, match="missing.pt not found"):
        reward_funcs.parse_reward_funcs([f"classifier:{tmp_path / 'missing.pt'}"], [])
    with pytest.raises(ValueError, match="needs the classifier's path"):
        reward_funcs.parse_reward_funcs(["classifier:"], [])
    with pytest.raises(ValueError, match=r"unknown reward function.*'classifer:x'.*classifier:ARG"):
        reward_funcs.parse_reward_funcs(["classifer:x"], [])
    mixed = reward_funcs.parse_reward_funcs(["format", f"classifier:{path}", "reward_model"], [1.0, 2.0, 0.5],
                                            model_names=("reward_model",))
    assert [(s.fn is None, s.weight) for s in mixed] == [(False, 1.0), (False, 2.0), (True, 0.5)]


# ------------------------------------------------------------------------------------------- KL estimator

@torch.no_grad()
def exact_kl(policy, ref, prompt: list[int], max_new_tokens: int, eos: int, vocab: int) -> float:
    """KL(π || ref) over every response of at most max_new_tokens tokens (stopping at eos), by enumeration."""
    def logp(model, y):
        lp = torch.log_softmax(model(torch.tensor([prompt + y]))[0].float(), -1)  # (T, V)
        return sum(float(lp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(y))

    def responses(prefix):
        if len(prefix) == max_new_tokens or (prefix and prefix[-1] == eos):
            yield prefix
            return
        for v in range(vocab):
            yield from responses(prefix + [v])

    total = 0.0
    for y in responses([]):
        lp, lq = logp(policy, y), logp(ref, y)
        total += math.exp(lp) * (lp - lq)
    return total


def test_sequence_kl_monte_carlo_mean_converges_to_the_exact_kl():
    """The frontier's KL axis: the mean of sample_and_score's per-sample k1 values over many samples is the exact
    KL(pi || ref), enumerated over every response of <= 2 tokens."""
    V = 8
    policy, ref = tiny_model(0, vocab_size=V), tiny_model(1, vocab_size=V)
    with torch.no_grad():
        policy.backbone.norm.weight.mul_(4)  # sharper logits than the random init's: a KL far from 0
    tok = DigitTok()
    prompts = [{"prompt_ids": [5, 6, 1], "prompt_text": "a"}, {"prompt_ids": [2, 7], "prompt_text": "b"}]
    reward = text_judge(lambda p, c: [float(len(x)) for x in c])
    n = 1500
    many = sample_and_score(policy, tok, prompts[:1], {"reward": reward}, ref, samples_per_prompt=n,
                            max_new_tokens=2, seed=3, micro_batch_size=n)
    exact = exact_kl(policy, ref, prompts[0]["prompt_ids"], 2, DigitTok.eos_id, V)
    se = float(many.kl.std()) / math.sqrt(n)
    assert exact > 0.3 and abs(float(many.kl.mean()) - exact) < 4 * se
    res = sample_and_score(policy, tok, prompts, {"reward": reward}, ref, samples_per_prompt=4, max_new_tokens=3)
    s = summarize(res, "reward", n_examples=2)
    assert s["n_samples"] == 8 and [e["prompt"] for e in s["examples"]] == ["a", "b"]
    assert s["reward"] == pytest.approx(float(res.scores["reward"].mean()))
    assert s["kl"] == pytest.approx(float(res.kl.mean()))


# ------------------------------------------------------------------------------------- the whole experiment

TINY = dataclasses.replace(
    experiment.QUICK, vocab_size=320, tokenizer_reviews=100, classifier_steps=20, continuation_tokens=12,
    max_new_tokens=16, rl_prompts=16, eval_prefixes=8, eval_samples=2, sft_steps=3, sft_batch=32, pref_prefixes=8,
    rm_steps=1, dpo_betas=(0.1,), dpo_steps=2, dpo_eval_every=1, ppo_steps=1, ppo_eval_every=1,
    ppo_prompts_per_step=8, grpo_steps=1, grpo_eval_every=1, grpo_prompts_per_step=4, grpo_generations=2,
    pft_steps=1, pft_eval_every=1, ul_steps=1, ul_eval_every=1, bon_prefixes=4, bon_max_n=4)


def test_experiment_plumbing_on_a_tiny_configuration(fixture_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the scripts' subprocesses (see conftest.run)
    root, _, tar = fixture_dir
    out = tmp_path / "out"
    table = experiment.run_experiment(tar, out, TINY, seeds=[0], methods=("dpo", "grpo", "ul", "best_of_n"),
                                      scale_name="tiny")
    printed = capsys.readouterr().out
    assert "[sft] $ " in printed and "train_dpo.py" in printed and "--stop_after_steps 1" in printed
    assert "--resume" in printed  # DPO's second segment continued the first run
    pairs = [json.loads(l) for l in (out / "prefs" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    assert {"prompt", "chosen", "rejected", "group"} <= set(pairs[0])
    points = sorted((out / "runs" / "dpo_b0.1_s0" / "frontier").glob("step_*.json"))
    assert [json.loads(p.read_text())["step"] for p in points] == [1, 2]
    assert (out / "runs" / "grpo_s0" / "frontier" / "step_00001.json").exists()
    ul = json.loads((out / "runs" / "ul_s0" / "frontier" / "step_00001.json").read_text())
    assert ul["method"] == "ul" and "--loss_type unlikelihood" in printed and 0 <= ul["judge2"] <= 1
    sft = json.loads((out / "sft" / "frontier" / "final.json").read_text())
    assert sft["kl"] == 0.0 and sft["n_samples"] == 16 and 0 <= sft["reward"] <= 1
    # the second judge and the degeneracy measures score every evaluated checkpoint, beside the true reward
    judge2 = json.loads((out / "judge2" / "metrics.json").read_text())
    assert 0 <= judge2["test"]["accuracy"] <= 1 and judge2["vocab"] > 0
    for point in [sft] + [json.loads(p.read_text()) for p in points]:
        assert 0 <= point["judge2"] <= 1 and point["judge2_se"] >= 0
        assert 0 <= point["distinct_1"] <= 1 and 0 <= point["distinct_2"] <= 1 and 0 <= point["repeat_3"] <= 1
    text = (out / "report.md").read_text()
    for needle in ("test-split accuracy", "KL <= 1", "DPO", "GRPO (true reward)", "Best-of-N (learned RM)",
                   "GFLOP/s", "Sampled continuations", "| dpo_b0.1_s0/train |", "Second judge (never used for training",
                   "best second judge, KL <= 1", "| second judge | KL (nats) | distinct-1 | distinct-2 |", "| sft", "Unlikelihood"):
        assert needle in text
    assert "DPO" in table
    res = json.loads((out / "results.json").read_text())
    assert res["series"]["dpo"][0]["kl"] == 0.0 and len(res["series"]["dpo"]) == 3  # SFT start + 2 points
    assert all(p["judge2"] is not None and p["repeat_3"] is not None for p in res["series"]["dpo"])
    assert res["judge2"]["test"]["n"] == judge2["test"]["n"]
    # a second invocation skips everything that is done and writes the same points
    experiment.run_experiment(tar, out, TINY, seeds=[0], methods=("dpo", "grpo", "ul", "best_of_n"))
    again = capsys.readouterr().out
    assert " $ " not in again and "already done" in again


def test_model_preset_flag_parses_and_a_changed_preset_is_refused(fixture_dir, tmp_path, capsys):
    _, name, scale, seeds = experiment.parse_args(["--imdb", "x", "--quick", "--model_preset", "gpt2-small"])
    assert (name, scale.preset, seeds) == ("quick", "gpt2-small", [0])
    assert dataclasses.replace(scale, preset="cpu") == experiment.QUICK  # only the preset changed
    _, name, scale, _ = experiment.parse_args(["--imdb", "x"])
    assert (name, scale.preset) == ("full", "cpu")
    with pytest.raises(SystemExit) as e:
        experiment.parse_args(["--imdb", "x", "--model_preset", "gpt3"])
    assert e.value.code == 2 and "invalid choice: 'gpt3'" in capsys.readouterr().err
    assert decoder.model_config("gpt2-small").dim == 768 and decoder.model_config("gpt2-small").n_layers == 12
    # an --out whose SFT model has another preset: refused before any training (every later stage starts from it)
    _, _, tar = fixture_dir
    out = tmp_path / "out"
    (out / "sft").mkdir(parents=True)
    (out / "sft" / "config.json").write_text(json.dumps({"preset": "cpu"}))
    with pytest.raises(UserError, match="holds an SFT model of preset 'cpu', not 'gpt2-small'"):
        experiment.run_experiment(tar, out, dataclasses.replace(TINY, preset="gpt2-small"), seeds=[0],
                                  methods=("dpo",))


def test_docstring_does_not_credit_the_paper_with_best_of_n():
    """The DPO paper's IMDb figure (Rafailov et al. 2023, Fig. 2 left) has no best-of-N baseline: the module must not
    say that its analytic KL is used "as the paper's baselines do", and must say where best-of-N's KL comes from."""
    doc = " ".join(experiment.__doc__.split())
    assert "as the paper's baselines do" not in doc
    assert "the DPO paper's IMDb figure has no best-of-N" in doc and "exact for ties" in doc


def test_every_method_runs_on_every_seed_and_the_report_has_the_20_nat_bucket(tmp_path):
    """Issue 32: medians over seeds for every method, not DPO and PPO only (before: the other methods ran with the
    first seed alone), and the KL buckets <= 1, 3, 10, 20."""
    paths = {"rl_train": "rl.jsonl"}
    prefs = {"pairs": "p.jsonl", "pairs_eval": "pe.jsonl", "pft": "pft.jsonl"}
    runs = experiment.method_runs(tmp_path, paths, prefs, experiment.QUICK, [0, 1, 2], experiment.METHODS)
    per_method = {}
    for r in runs:
        per_method.setdefault(r.method, set()).add(r.seed)
        assert ["--seed", r.seed] == r.args[r.args.index("--seed"):][:2]
    assert per_method == {m: {0, 1, 2} for m in experiment.METHODS if m != "best_of_n"}  # best-of-N: no training
    assert sum(r.method == "dpo" for r in runs) == 3 * len(experiment.QUICK.dpo_betas)
    ser = {"dpo": [{"kl": 15.0, "reward": 0.8, "seed": s} for s in (0, 1, 2)]}
    table = experiment.budget_table(ser)
    assert "KL <= 20" in table and "0.800 [0.800, 0.800] (3 seeds)" in table
