"""Prompt readers on the real prompt files in ../shared/data, their error messages, and the group sampler."""
import json
import os
from collections import Counter

import pytest
import torch

from engine.data import GroupSampler, load_prompts, ocr_target, validate_geneval_metadata

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def shared(rel: str) -> str:
    path = os.path.normpath(os.path.join(DATA, rel))
    if not os.path.isfile(path):
        pytest.fail(f"real prompt file {path} is missing: the repo expects ../shared/data beside it (see README)")
    return path


# ---------------------------------------------------------------- readers on the real files

def test_geneval_metadata_real_file():
    ps = load_prompts(shared("geneval/test_metadata.jsonl"))
    assert ps.kind == "geneval"
    assert len(ps) == 2212  # 553 distinct prompts x 4, as published
    assert len(set(ps.prompts)) == 553
    assert set(Counter(m["tag"] for m in ps.metadata)) == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"}
    for prompt, meta in zip(ps.prompts, ps.metadata):
        assert meta["prompt"] == prompt
    pos = [m for m in ps.metadata if m["tag"] == "position"]
    assert all(m["include"][1]["position"][1] == 0 for m in pos)
    # the first record, as in the file
    assert ps.metadata[0]["include"] == [{"class": "wine glass", "count": 2}]
    assert ps.metadata[0]["exclude"] == [{"class": "wine glass", "count": 3}]


def test_ocr_prompts_real_file():
    ps = load_prompts(shared("ocr/test.txt"), kind="ocr")
    assert len(ps) == 1018 and ps.kind == "ocr"  # the README says 1,017: wc -l misses the unterminated last line
    assert ocr_target(ps.prompts[0]) == "Spring Collection 2024"
    assert all(ocr_target(p) for p in ps.prompts)


def test_drawbench_real_file():
    ps = load_prompts(shared("drawbench/test.txt"))
    assert len(ps) == 200 and ps.kind == "plain"
    assert ps.prompts[4] == "An elephant under the sea."
    assert ps.metadata[4] == {"prompt": "An elephant under the sea."}


def test_limit_and_select():
    ps = load_prompts(shared("drawbench/test.txt"), limit=7)
    assert len(ps) == 7
    prompts, meta = ps.select([6, 0])
    assert prompts == [ps.prompts[6], ps.prompts[0]] and meta[0]["prompt"] == ps.prompts[6]


# ---------------------------------------------------------------- readers: formats and errors

def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_txt_skips_blank_lines_and_records_line_numbers(tmp_path):
    ps = load_prompts(write(tmp_path, "p.txt", "a cat\n\n   \n  a dog  \n"))
    assert ps.prompts == ["a cat", "a dog"] and ps.lines == [1, 4]


def test_jsonl_keeps_metadata(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"prompt": "x", "seed": 3}\n\n{"prompt": "y"}\n')
    ps = load_prompts(path)
    assert ps.kind == "plain" and ps.prompts == ["x", "y"] and ps.metadata[0] == {"prompt": "x", "seed": 3}


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "ok"}\n{"prompt": "x",\n', ":2: invalid JSON"),
    ('{"prompt": "ok"}\n[1, 2]\n', ":2: expected a JSON object"),
    ('{"prompt": "ok"}\n\n{"caption": "x"}\n', ":3: expected a non-empty string 'prompt'"),
    ('{"prompt": 5}\n', ":1: expected a non-empty string 'prompt'"),
    ('{"prompt": "  "}\n', ":1: expected a non-empty string 'prompt'"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, text, message):
    path = write(tmp_path, "bad.jsonl", text)
    with pytest.raises(ValueError) as e:
        load_prompts(path)
    assert path + message in str(e.value)


GOOD = {"tag": "position", "prompt": "a cow right of a laptop",
        "include": [{"class": "laptop", "count": 1}, {"class": "cow", "count": 1, "position": ["right of", 0]}]}


@pytest.mark.parametrize("patch, message", [
    ({"tag": 3}, "string 'tag'"),
    ({"include": []}, "non-empty list 'include'"),
    ({"include": [{"class": "cow"}]}, "include[0]: expected an integer 'count'"),
    ({"include": [{"class": "cow", "count": 0}]}, "include[0]: expected an integer 'count' >= 1"),
    ({"include": [{"class": "", "count": 1}]}, "include[0]: expected a non-empty string 'class'"),
    ({"include": [{"class": "cow", "count": 1, "color": 7}]}, "include[0].color must be a string"),
    ({"include": [{"class": "cow", "count": 1, "position": ["left of", 0]}]}, "earlier include (< 0)"),
    ({"include": [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["near", 0]}]}, "relation"),
    ({"exclude": {"class": "cow"}}, "'exclude' must be a list"),
    ({"exclude": [{"class": "cow", "count": "2"}]}, "exclude[0]: expected an integer 'count'"),
])
def test_geneval_errors_name_file_line_and_key(tmp_path, patch, message):
    bad = {**GOOD, **patch}
    path = write(tmp_path, "g.jsonl", json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError) as e:
        load_prompts(path, kind="geneval")
    assert f"{path}:2: " in str(e.value) and message in str(e.value)


def test_geneval_validator_accepts_real_shapes():
    assert validate_geneval_metadata(GOOD) is GOOD


def test_ocr_convention_checked_on_load(tmp_path):
    path = write(tmp_path, "o.txt", 'a sign saying "OPEN"\n\na plain sign with no quotes\n')
    with pytest.raises(ValueError) as e:
        load_prompts(path, kind="ocr")
    assert f"{path}:3: " in str(e.value) and "double quotes" in str(e.value)
    with pytest.raises(ValueError, match="double quotes"):
        load_prompts(write(tmp_path, "o2.txt", 'a sign saying " "\n'), kind="ocr")
    assert load_prompts(path).kind == "plain"  # without kind="ocr" no convention is imposed


def test_missing_empty_and_unknown_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(write(tmp_path, "e.txt", "\n\n"))
    with pytest.raises(ValueError, match="unknown extension '.csv'"):
        load_prompts(write(tmp_path, "p.csv", "a\n"))
    with pytest.raises(ValueError, match="kind must be one of"):
        load_prompts(write(tmp_path, "p.txt", "a\n"), kind="images")
    with pytest.raises(ValueError, match="must be a .jsonl"):
        load_prompts(write(tmp_path, "p2.txt", "a\n"), kind="geneval")


# ---------------------------------------------------------------- GroupSampler

def test_sampler_layout_whole_groups():
    P, G, W = 8, 3, 4
    batches = [GroupSampler(100, P, G, W, r, seed=5).epoch(2) for r in range(W)]
    flat_groups = torch.cat([b.group_ids for b in batches])
    flat_prompts = torch.cat([b.prompt_idx for b in batches])
    assert torch.equal(flat_groups, batches[0].all_group_ids)
    assert torch.equal(flat_prompts, batches[0].all_prompt_idx)
    assert torch.equal(flat_groups, torch.arange(P).repeat_interleave(G))
    for r, b in enumerate(batches):
        assert b.prompt_idx.dtype == torch.long and b.group_ids.dtype == torch.long
        assert b.local_slice == slice(r * P * G // W, (r + 1) * P * G // W)
        assert b.straddling_groups == ()
        # whole groups: every group on this rank has all G samples here
        assert all(c == G for c in Counter(b.group_ids.tolist()).values())
    # each group is one prompt, repeated G times; prompts distinct within the epoch
    drawn = flat_prompts.view(P, G)
    assert bool((drawn == drawn[:, :1]).all()) and len(set(drawn[:, 0].tolist())) == P


def test_sampler_straddling_groups_reported():
    P, G, W = 3, 4, 2  # 12 samples, 6 per rank: group 1 is split between rank 0 and rank 1
    s0, s1 = GroupSampler(10, P, G, W, 0, seed=1), GroupSampler(10, P, G, W, 1, seed=1)
    assert not s0.groups_whole
    b0, b1 = s0.epoch(0), s1.epoch(0)
    assert b0.straddling_groups == b1.straddling_groups == (1,)
    assert b0.group_ids.tolist() == [0, 0, 0, 0, 1, 1] and b1.group_ids.tolist() == [1, 1, 2, 2, 2, 2]
    assert s0.describe().endswith("groups [1] straddle rank boundaries")
    assert GroupSampler(10, 4, 3, 2, 0).describe().endswith("2 whole groups per rank")
    # a larger uneven case: every boundary that falls inside a group is reported
    s = GroupSampler(20, 5, 4, 4, 0)  # 20 samples, 5 per rank: boundaries at 5, 10, 15 -> groups 1, 2, 3
    assert s.epoch(0).straddling_groups == (1, 2, 3)


def test_sampler_determinism_and_epochs():
    a, b = GroupSampler(50, 10, 2, seed=7), GroupSampler(50, 10, 2, seed=7)
    assert torch.equal(a.epoch(3).prompt_idx, b.epoch(3).prompt_idx)
    # resume: epoch 3 does not depend on which epochs were drawn before
    b.epoch(0), b.epoch(1)
    assert torch.equal(a.epoch(3).prompt_idx, b.epoch(3).prompt_idx)
    assert not torch.equal(a.epoch(3).prompt_idx, a.epoch(4).prompt_idx)
    assert not torch.equal(a.epoch(3).prompt_idx, GroupSampler(50, 10, 2, seed=8).epoch(3).prompt_idx)
    # every prompt drawn exactly once when P == num_prompts
    full = GroupSampler(12, 12, 1, seed=0).epoch(9)
    assert sorted(full.prompt_idx.tolist()) == list(range(12))


def test_sampler_balances_strata():
    """The testbed training file (71% colour-binding prompts) drawn with tag strata: every epoch's prompts are
    distinct and spread evenly over the tags (P = 12 over 6 tags: 2 each), deterministic per (seed, epoch); over
    many epochs each small tag's few prompts are all used."""
    ps = load_prompts(os.path.join(os.path.dirname(__file__), "..", "data", "testbed", "train.jsonl"))
    strata = ps.tag_ids()
    per_tag = Counter(strata)
    assert len(per_tag) == 6 and per_tag.most_common(1)[0][1] == 110
    s = GroupSampler(len(ps), 12, 4, seed=3, strata=strata)
    seen = Counter()
    for e in range(20):
        drawn = s.permutation(e)
        assert len(set(drawn.tolist())) == 12
        assert sorted(Counter(strata[i] for i in drawn).values()) == [2] * 6
        seen.update(drawn.tolist())
        assert torch.equal(s.epoch(e).prompt_idx, GroupSampler(len(ps), 12, 4, seed=3, strata=strata).epoch(e).prompt_idx)
    assert all(seen[i] >= 1 for i, t in enumerate(strata) if per_tag[t] <= 6)
    # P larger than the smallest tag: the small tags run out, the draw is still P distinct prompts
    big = GroupSampler(len(ps), 40, 1, seed=3, strata=strata).permutation(0)
    counts = Counter(strata[i] for i in big)
    assert len(set(big.tolist())) == 40 and min(counts.values()) == 3 and max(counts.values()) >= 7
    # the checkpoint check tells a stratified sampler from a uniform one
    with pytest.raises(ValueError, match="strata"):
        s.check_state_dict(GroupSampler(len(ps), 12, 4, seed=3).state_dict())
    with pytest.raises(ValueError, match="strata for"):
        GroupSampler(10, 2, 2, strata=[0] * 9)
    with pytest.raises(ValueError, match="no 'tag'"):
        load_prompts(shared("drawbench/test.txt")).tag_ids()


def test_sampler_state_dict_check():
    s = GroupSampler(50, 10, 2, seed=7)
    s.check_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="seed: checkpoint 8 vs now 7"):
        s.check_state_dict({**s.state_dict(), "seed": 8})


@pytest.mark.parametrize("args, message", [
    ((10, 11, 2, 1, 0, 0), "exceeds num_prompts"),
    ((10, 3, 3, 2, 0, 0), "do not split evenly"),
    ((10, 4, 2, 2, 2, 0), "rank must be in"),
    ((10, 0, 2, 1, 0, 0), "prompts_per_epoch must be an integer >= 1"),
    ((10, 4, 2.0, 1, 0, 0), "group_size must be an integer"),
])
def test_sampler_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        GroupSampler(*args)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        GroupSampler(10, 2, 2).epoch(-1)
