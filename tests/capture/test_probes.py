import json

import pytest

from topomon.capture.probes import ProbeError, default_probes, load_probes


def test_default_set_is_packaged_and_varied():
    texts = default_probes()
    assert len(texts) == 64
    assert len(set(texts)) == 64
    assert any("\n" in t for t in texts)  # code keeps its line breaks


def test_sources(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("one text\n\nanother text\n")
    assert load_probes(str(txt)) == ["one text", "another text"]
    jl = tmp_path / "p.jsonl"
    jl.write_text("\n".join(json.dumps({"prompt": f"t{i}"}) for i in range(5)))
    assert load_probes(jl, field="prompt", max_probes=3) == ["t0", "t1", "t2"]
    from datasets import Dataset

    assert load_probes(Dataset.from_dict({"text": ["a b", "c d"]})) == ["a b", "c d"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "holds no texts"),
        (b'{"text": "ok"}\n{"text": "broken"\n', r"line 2: malformed JSON"),
        (b'{"text": "ok"}\n{"body": "x"}\n', r"line 2: no field 'text'"),
        (b'{"text": "ok"}\n{"text": 3}\n', r"line 2 must be a string"),
        (b'{"text": "ok"}\n{"text": "   "}\n', r"line 2 is empty"),
        (b'{"text": "ok"}\n\xff\xfe\n', r"not UTF-8 text \(bad byte on line 2\)"),
    ],
)
def test_bad_jsonl_names_the_line(tmp_path, content, match):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(ProbeError, match=match):
        load_probes(path)


def test_other_bad_inputs(tmp_path):
    with pytest.raises(ProbeError, match="not found"):
        load_probes(tmp_path / "nope.jsonl")
    with pytest.raises(ProbeError, match="empty"):
        load_probes([])
    with pytest.raises(ProbeError, match=r"probes\[1\] must be a string"):
        load_probes(["fine", None])
    with pytest.raises(ProbeError, match="characters long"):
        load_probes(["x" * 200_001])
    with pytest.raises(ProbeError, match="must be None, a list of strings"):
        load_probes(42)


def test_max_probes_spreads_over_the_default_set_and_keeps_the_first_of_a_user_set():
    full = default_probes()
    half = load_probes(None, max_probes=32)
    assert half == full[::2]  # 64 texts grouped by genre: every other one keeps every genre
    assert len(set(load_probes(None, max_probes=7))) == 7 and load_probes(None, max_probes=7)[0] == full[0]
    with pytest.warns(UserWarning, match="max_probes=2"):
        assert load_probes(["a b", "c d", "e f"], max_probes=2) == ["a b", "c d"]
