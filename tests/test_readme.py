"""The README, run (and docs/evaluation.md, which continues it): every command of their ```bash blocks and every
```python block, top to bottom in one scratch folder as a new user would, with only the sizes of long runs cut down
(SMALLER, each rule checked to apply); and its CLI reference checked against the real commands and options. The
README and the tool cannot drift apart.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDES = [README, ROOT / "docs" / "evaluation.md"]  # run in this order, in one scratch folder
BIN = Path(sys.executable).parent

# The README's long runs, made smaller: (command words, option, value). The value replaces the README's or is
# added when the README leaves the option at its default. Every rule must apply to some README command.
SMALLER: list[tuple[tuple[str, ...], str, str]] = [
    (("data", "make", "shapesworld"), "--n", "200"),  # 2,000 scenes → 200, except the walkthrough's 400 (below)
    (("train",), "--steps", "2"),
    (("train",), "--batch-size", "32"),
    (("train",), "--warmup", "1"),
    (("bench", "index"), "--n", "10000"),
    (("bench", "serve"), "--requests", "30"),
    (("bench", "encode"), "--n", "200"),
    (("bench", "update"), "--drift-n", "3000"),
    (("bench", "update"), "--dim", "64"),
    (("bench", "update"), "--n", "100"),
    (("bench", "update"), "--add", "20"),
    (("bench", "ray"), "--n", "300"),
    (("bench", "shards"), "--n", "20000"),
    (("bench", "shards"), "--dim", "32"),
    (("bench", "train"), "--steps", "7"),
    (("bench", "train"), "--batch-size", "32"),
    (("demo",), "--n-shapes", "120"),
    (("demo",), "--n-digits", "100"),
    (("results",), "--models", "sparc-tiny"),  # a late-fusion model: score, head and rerank rows
    (("results",), "--index-n", "3000"),
    (("results",), "--encode-n", "64"),
]
KEEP = {("data", "make", "shapesworld"): {"--n": "400"}}  # the walkthrough's size: its ids (000360…) depend on it

# Commands a test cannot run, with the reason; each must still be in the README.
NOT_RUN = {
    'pip uninstall -y faiss-cpu && pip install "faiss-gpu>=1.14.3"': "swaps this environment's FAISS for ~740 MB of "
                                                                      "CUDA wheels",
    "make test": "it is this test run (CI runs it through .ci/run)",
    "retrieval models pull fuselip-b-cc12m": "downloads from the Hugging Face hub",
    "retrieval index build photos/ --model fuselip-b-cc12m --out idx-photos-fuselip": "downloads from the Hugging Face "
                                                                                     "hub",
}


def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, body, line number) of every fenced block."""
    return [(m.group(1), m.group(2), text[:m.start()].count("\n") + 1)
            for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)]


def command_lines(body: str) -> list[str]:
    """A shell block's commands, backslash continuations joined, blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    lines = [re.sub(r"(^|\s+)#\s.*$", "", line).strip() for line in joined.splitlines()]  # trailing comments
    return [line for line in lines if line]


def smaller(argv: list[str], fired: set[int]) -> list[str]:
    """argv (after `retrieval`) with SMALLER applied; records which rules applied."""
    argv = list(argv)
    for i, (words, option, value) in enumerate(SMALLER):
        if tuple(argv[:len(words)]) != words:
            continue
        if option in argv and KEEP.get(words, {}).get(option) == argv[argv.index(option) + 1]:
            continue
        fired.add(i)
        if option in argv:
            argv[argv.index(option) + 1] = value
        else:
            argv += [option, value]
    return argv


def make_recipe(target: str) -> list[str]:
    """The `retrieval …` lines `make TARGET` runs (the set-up it depends on is this test's own environment)."""
    out = subprocess.run(["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True, check=True).stdout
    lines = [line.split("/bin/retrieval ", 1)[1] for line in out.splitlines() if "/bin/retrieval " in line]
    assert lines, f"make {target} runs no retrieval command:\n{out}"
    return ["retrieval " + line for line in lines]


# ---------------------------------------------------------------- what the user brings: downloads the README names


def official_fuselip(folder: Path) -> None:
    """A FuseLIP checkpoint folder in the official layout (reduced width; random weights)."""
    from test_fuselip_import import official_config_json, random_official_state

    folder.mkdir(parents=True)
    torch.save(random_official_state(), folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(official_config_json()), encoding="utf-8")


def clip_bpe(folder: Path) -> None:
    from test_fuselip_import import write_clip_bpe

    folder.mkdir(parents=True)
    write_clip_bpe(folder)


def official_fdt(path: Path) -> None:
    """A reduced random FDT checkpoint with the released model's 512-dimensional embeddings (imported under its
    registered name, whose dimension is checked)."""
    from test_fdt_import import random_official_state, save_official

    save_official(random_official_state(dim=512), path)


def coco_copy(folder: Path) -> None:
    """COCO's Karpathy-split file and images, twenty test images (tests/benchmark_layouts.py)."""
    from benchmark_layouts import write_karpathy

    write_karpathy(folder, "coco", list(range(40, 60)))


def cirr_copy(folder: Path) -> None:
    from test_benchmarks import cirr_fixture

    cirr_fixture(folder)


def mmeb_copy(folder: Path) -> None:
    from benchmark_layouts import MMEB_INSTRUCTION, write_mmeb

    rows = [{"query": 3, "qry_text": MMEB_INSTRUCTION + "what colour is it?\n", "targets": [3, 4, 5]},
            {"query": 6, "qry_text": MMEB_INSTRUCTION + "how many?\n", "targets": [6, 3]}]
    write_mmeb(folder, {"OK-VQA": rows, "VisDial": rows})


DOWNLOADS: dict[str, Callable[[Path], None]] = {
    "FuseLIP-S-CC3M-MM": official_fuselip, "clip-bpe": clip_bpe, "ckpt_86560.pth.tar": official_fdt,
    "coco/": coco_copy, "cirr/": cirr_copy, "mmeb-eval/": mmeb_copy,
}


# ---------------------------------------------------------------- checks of what some commands printed or wrote


def hits(stdout: str) -> list[str]:
    """The ids of a printed hit table."""
    lines = stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["rank", "score", "id"], stdout
    return [line.split()[2] for line in lines[1:]]


def check_filtered_json(out: str, cwd: Path) -> None:
    rows = json.loads(out)
    assert len(rows) == 3 and all(r["split"] == "test" and r["n_objects"] > 1 for r in rows)
    assert all("caption" in r and r["text"] is None for r in rows)  # the caption is metadata, not embedded


def check_own_edits(out: str, cwd: Path) -> None:
    ids = hits(out)
    assert len(ids) == 3 and all(i.startswith("shapes-000360-") for i in ids)


def check_png(name: str) -> Callable[[str, Path], None]:
    def check(out: str, cwd: Path) -> None:
        with Image.open(cwd / name) as image:
            assert image.format == "PNG" and min(image.size) >= 64

    return check


def check_codes(out: str, cwd: Path) -> None:
    columns = duckdb.sql(f"DESCRIBE SELECT * FROM '{cwd}/emb-codes/part-*.parquet'").fetchall()
    assert {"image_code_ids", "image_code_weights", "text_code_ids", "text_code_weights"} <= {c[0] for c in columns}


def check_python(out: str, cwd: Path) -> None:
    lines = out.strip().splitlines()
    assert len(lines) == 5 and lines[-1] == "(2, 128) float32", out
    assert lines[3].split()[0].startswith("shapes-000360-"), out


def check_served_edits(out: str, cwd: Path) -> None:
    answer = json.loads(out)
    assert [h["id"].startswith("shapes-000360-") for h in answer["hits"]] == [True] * 3, out
    assert answer["timings_ms"]["total"] > 0 and answer["hits"][0]["image_url"].startswith("/items/idx-edits/")


def check_served_list(out: str, cwd: Path) -> None:
    answers = json.loads(out)
    assert [len(a["hits"]) for a in answers] == [2, 2] and all(h["n_objects"] > 1 for h in answers[0]["hits"])


def more_rows(cwd: Path) -> int:
    return duckdb.sql(f"SELECT count(*) FROM '{cwd}/shapes/more.csv'").fetchall()[0][0]


def check_added(out: str, cwd: Path) -> None:
    """The first add adds every row of more.csv; the same add again finds every one unchanged."""
    found = re.search(r"added (\d+) \(replacing 0\), unchanged (\d+), skipped 0", out)
    assert found and sorted(map(int, found.groups())) == [0, more_rows(cwd)], out


def check_deleted(out: str, cwd: Path) -> None:
    assert f"deleted {more_rows(cwd)};" in out, out


def check_new_only(out: str, cwd: Path) -> None:
    ids = hits(out)
    assert len(ids) == 3 and all(i.startswith("new-") for i in ids), out


def check_compacted(out: str, cwd: Path) -> None:
    before, after = map(float, re.search(r"([\d.]+) MB → ([\d.]+) MB on disk", out).groups())
    assert after < before and "removed 2 old files" in out, out


def check_live_rows(out: str, cwd: Path) -> None:
    """The store after the README's add, delete and compact: each live item once, read the same three ways."""
    version, count, rows = map(int, out.splitlines()[0].split())
    expected = duckdb.sql(f"SELECT count(*) FROM '{cwd}/shapes/corpus.jsonl'").fetchall()[0][0]
    assert version == 4 and count == rows == expected and out.count(str(expected)) >= 3, out


def check_mmeb(out: str, cwd: Path) -> None:
    header = out.splitlines()[0]
    assert "mmeb/OK-VQA" in header and "mmeb/VQA (1 of 10)" in header and "mmeb/Retrieval (1 of 12)" in header, out


def check_demo(out: str, cwd: Path) -> None:
    """Every output of `retrieval demo` exists; the contact sheets are PNGs with the query and k hits per model;
    the printed eval table has every model and task."""
    import numpy as np

    from evaluation.demo import BUNDLED, CAPTION, KINDS, QUERY_COLS, THUMB

    k, folder = 5, cwd / "demo"  # the demo's default -k
    summary = json.loads((folder / "demo.json").read_text())
    assert summary["models"] == list(BUNDLED)
    for kind in KINDS:
        assert f"{kind.name}: " in out
        with Image.open(folder / f"contact-{kind.slug}.png") as image:
            assert image.format == "PNG"
            # one row per model; the model name, the query (its image with its text beside it), then k hits
            columns = 1 + QUERY_COLS + k
            assert image.size == ((THUMB + 8) * columns, (THUMB + CAPTION + 8) * len(BUNDLED))
            hit_cell = image.convert("RGB").crop(((THUMB + 8) * (columns - 1), 0, (THUMB + 8) * columns, THUMB))
            assert len(np.unique(np.asarray(hit_cell).reshape(-1, 3), axis=0)) > 10  # the last hit is drawn
        for model in BUNDLED:
            assert len(summary["queries"][kind.name][model]) == k
    # the image + instruction query is asked as tgit asks it: among the rotations of its own scene only
    assert "asked among the 18 rotations of that scene only, as the tgit task asks it" in out
    for model in BUNDLED:
        ids = summary["queries"]["image + instruction"][model]
        assert len({i.rsplit("-", 1)[0] for i in ids}) == 1 and all(i.rsplit("-", 1)[1].startswith("rotate")
                                                                     for i in ids), ids
    report = json.loads((folder / "eval.json").read_text())
    tasks = {(r["dataset"], r["task"]) for r in report["results"]}
    assert {"t2i", "i2t", "tgit", "tgit-pool", "vqa", "pos", "zeroshot"} <= {t for _, t in tasks}
    table = out[out.index("model "):]
    for dataset, task in tasks:
        assert f"{dataset}/{task}" in table.splitlines()[0]
    assert all(model in table for model in BUNDLED) and (folder / "eval.md").is_file()


def check_bench_train(out: str, cwd: Path) -> None:
    """`bench train`: length groups and one padded batch give the same float32 loss on every batch (padding is
    masked), bf16 the same up to its rounding; the report's ratios are the ratios of its timings."""
    report = json.loads((cwd / "bench-train.json").read_text())
    assert report["model"] == "fuselip-tiny" and report["timed_steps"] == 2  # --steps 7 (SMALLER)
    assert (report["length_multiple"], report["row_multiple"]) == (8, 4)
    seconds = report["seconds_per_step"]
    assert set(seconds) == {"padded", "grouped", "grouped-bf16"} and min(seconds.values()) > 0
    for name, ratio in report["speedup"].items():
        assert ratio == pytest.approx(seconds["padded"] / seconds[name])
    assert report["mean_groups_per_side"] > 1  # the grouped passes really ran in groups
    assert report["max_relative_loss_difference"]["grouped"] < 1e-4
    assert report["max_relative_loss_difference"]["grouped-bf16"] < 3e-2


def check_results(out: str, cwd: Path) -> None:
    """The results page: written from this run's measurements, with every task row in each fusion mode and the
    rerank row, the bench sections and the published numbers, marked as theirs."""
    from evaluation.published import published_markdown

    text = (cwd / "docs" / "results.md").read_text()
    measured = json.loads((cwd / "docs" / "results-eval.json").read_text())
    summary = text[text.index("### Summary"):text.index("### Details")]
    assert measured["results"] and all(f"{r['dataset']}/{r['task']}" in summary for r in measured["results"])
    assert all(label in summary for label in ("sparc-tiny (score)", "sparc-tiny (head)", "sparc-tiny (rerank@20)"))
    assert "## ANN fidelity and speed" in text and "recall@10" in text and "plain recall@10" in text
    assert text.count("encode bench: ") == 1  # one per model
    assert published_markdown().strip() in text and "theirs, on their data" in text
    assert "| FuseLIP-B, CC3M+MM | 23.3 | 17.5 | 15.0 | 82.4 | 18.1 |" in text  # the README's own table, row by row
    assert "/tmp" not in summary  # no machine-local paths in the tables
    with Image.open(cwd / "docs" / "results-eval.png") as plot:
        assert plot.format == "PNG"


CHECKS: dict[str, Callable[[str, Path], None]] = {
    "make results": check_results,
    "bench train --data": check_bench_train,
    "make demo": check_demo,
    "eval mmeb --data mmeb-eval/": check_mmeb,
    "index add idx-photos shapes/more.csv": check_added,
    "index delete idx-photos": check_deleted,
    "--where \"split = 'test'\" -k 3": check_new_only,
    "index compact idx-photos": check_compacted,
    "-k 3 --json": check_filtered_json,
    "text=rotate 90 degrees clockwise": check_served_edits,
    '"n_objects > 1"}': check_served_list,
    "-o hit.png": check_png("hit.png"),
    "--where \"id LIKE 'shapes-000360-%'\"": check_own_edits,
    "--explain why.png": check_png("why.png"),
    "--explain tokens.png": check_png("tokens.png"),
    "--sparse-codes": check_codes,
    'retrieval.load_encoder("sparc-tiny")': check_python,
    'retrieval.open_store("idx-photos/store")': check_live_rows,
}


def run_command(line: str, cwd: Path, env: dict[str, str], fired: set[int]) -> subprocess.CompletedProcess:
    argv = shlex.split(line)
    if argv[0] == "retrieval":
        operators = shlex.shlex(line, posix=True, punctuation_chars=True)  # `|`, `&&`, `>` … outside quotes
        assert not any(set(token) <= set("();<>|&") for token in operators), f"shell syntax in: {line}"
        line = shlex.join(["retrieval", *smaller(argv[1:], fired)])
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def run_readme(guide: Path, work: Path, env: dict[str, str], fired: set[int], not_run: set[str], checked: set[str],
               servers: list[subprocess.Popen]) -> int:
    """Run every block of a guide (the README, or a document that continues it) in order; returns how many
    commands ran."""
    text = guide.read_text(encoding="utf-8")
    ran = 0
    for language, body, line_no in fenced_blocks(text):
        if language == "python":
            (work / f"block-{line_no}.py").write_text(body, encoding="utf-8")
            runs = [(f"python block-{line_no}.py", body)]
        elif language == "bash":
            runs = []
            for line in command_lines(body):
                if line in NOT_RUN:
                    not_run.add(line)
                elif line.startswith((". ", "source ")):
                    assert shlex.split(line)[1] == ".venv/bin/activate"  # the venv `make` creates; this test runs in it
                    assert "VENV ?= .venv" in (ROOT / "Makefile").read_text()
                elif line.startswith("make "):
                    runs += [(recipe, line) for recipe in make_recipe(line.split()[1])]
                else:
                    runs.append((line, line))
        else:
            assert language == "", f"{guide.name} line {line_no}: a ```{language} block is neither run nor checked"
            continue
        for line, source in runs:
            for name, write in DOWNLOADS.items():
                if name in line and not (work / name).exists():
                    write(work / name)
            if line.startswith("retrieval serve "):  # it runs until stopped: in the background, as in a second shell
                servers.append(start_server(line, work, env))
                continue
            start = time.perf_counter()
            proc = run_command(line, work, env, fired)
            print(f"{time.perf_counter() - start:6.1f} s  {line[:110]}")
            where = f"{guide.name} line {line_no}: {source}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            if "--device cuda" in line and not torch.cuda.is_available():
                errors = proc.stderr.strip().splitlines()
                assert proc.returncode == 2 and len(errors) == 1 and "CUDA" in errors[0], where
            else:
                assert proc.returncode == 0, where
            for needle, check in CHECKS.items():
                if needle in source:
                    check(proc.stdout, work)
                    checked.add(needle)
            ran += 1
    return ran


def start_server(line: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a README `retrieval serve` line in the background (its output to a log file beside the scratch
    folder); return once it says it listens."""
    log = cwd.parent / f"serve-{len(list(cwd.parent.glob('serve-*.log')))}.log"
    with open(log, "w") as out:
        server = subprocess.Popen(["bash", "-c", "exec " + line], cwd=cwd, env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 300
    while not log.read_text().startswith("serving "):
        assert server.poll() is None and time.monotonic() < deadline, f"{line}:\n{log.read_text()}"
        time.sleep(0.2)
    return server


@pytest.mark.slow
def test_every_readme_command_runs_top_to_bottom(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RETRIEVAL_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "2"}
    fired: set[int] = set()
    not_run, checked = set(), set()
    servers: list[subprocess.Popen] = []
    try:
        ran = sum(run_readme(guide, work, env, fired, not_run, checked, servers) for guide in GUIDES)
    finally:
        for server in servers:
            server.terminate()
            server.wait(60)
    assert servers, "the README starts no server"
    assert not_run == set(NOT_RUN), f"NOT_RUN lists commands the README no longer has: {set(NOT_RUN) - not_run}"
    assert checked == set(CHECKS), f"checks for commands the README no longer has: {set(CHECKS) - checked}"
    assert fired == set(range(len(SMALLER))), f"SMALLER rules that applied to nothing: " \
                                               f"{[SMALLER[i] for i in set(range(len(SMALLER))) - fired]}"
    assert all((work / name).exists() for name in DOWNLOADS)
    assert (work / "demo" / "demo.json").is_file() and (work / "docs" / "results.md").is_file()
    assert ran > 30


def test_ci_runs_the_readme_test_command():
    """The README's test command is what .ci/run runs."""
    first = next(body for language, body, _ in fenced_blocks(README.read_text(encoding="utf-8")) if language == "bash")
    assert "make test" in command_lines(first)[1]
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")


def cli_reference() -> list[str]:
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")  # the README links it
    section = text[text.index("# CLI reference"):]
    body = next(body for language, body, _ in fenced_blocks(section) if language == "")
    lines, current = [], ""
    for line in body.splitlines():
        if line.startswith("retrieval "):
            if current:
                lines.append(current)
            current = line.split("#")[0]
        elif line.split("#")[0].strip():
            current += " " + line.split("#")[0].strip()
    return lines + [current]


def test_cli_reference_names_real_commands_and_every_option():
    """Each reference line names a real command and only its options, and every option of every command is in
    the reference."""
    import typer

    from cli import app

    def is_group(command) -> bool:
        return hasattr(command, "commands")

    def option_params(command) -> list:
        return [p for p in command.params if p.param_type_name == "option"]

    root = typer.main.get_command(app)
    written: dict[str, set[str]] = {}
    commands: dict[str, typer.core.TyperCommand] = {}
    for line in cli_reference():
        words, command, path = line.split()[1:], root, []
        while is_group(command) and words and words[0] in command.commands:
            path.append(words[0])
            command = command.commands[words.pop(0)]
        assert not is_group(command), line
        options = {o for p in option_params(command) for o in (*p.opts, *p.secondary_opts)}
        named = set(re.findall(r"(?<![\w-])(-{1,2}[a-z][\w-]*)", line))
        assert named <= options, (line, named - options)
        written.setdefault(" ".join(path), set()).update(named)
        commands[" ".join(path)] = command

    def leaves(group, prefix: str = "") -> set[str]:
        return {name for key, c in group.commands.items()
                for name in (leaves(c, f"{prefix}{key} ") if is_group(c) else {prefix + key})}

    assert leaves(root) == set(written)
    for path, command in commands.items():
        left_out = [p.opts[0] for p in option_params(command) if not p.hidden
                    and p.opts[0] != "--help" and not {*p.opts, *p.secondary_opts} & written[path]]
        assert not left_out, (path, left_out)
