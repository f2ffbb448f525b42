import json
from types import SimpleNamespace

import pytest
import torch

from fewstep.data.spec import DatasetSpec, Modes
from fewstep.errors import ConfigError, DataError
from fewstep.eval import plots
from fewstep.eval.evaluate import (
    Candidate,
    best_at_nfe,
    best_teacher,
    evaluate,
    finest_teacher,
    format_table,
    ratios_to_teacher,
    write_json,
)
from fewstep.eval.speed import peak_memory, time_sampler
from fewstep.models.analytic import GaussianMixture
from fewstep.run import report_markdown
from test_eval_digits import make_digits_spec


@pytest.fixture(scope="module")
def spec() -> DatasetSpec:
    return make_digits_spec()


@pytest.fixture(scope="module", autouse=True)
def shared_cache(tmp_path_factory):
    # The same folder as tests/test_eval_digits.py uses: the classifier trains once per test session.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEWSTEP_CACHE", str(tmp_path_factory.getbasetemp() / "fewstep_cache"))
        yield


def real_images(spec: DatasetSpec):
    def draw(noise, labels, generator):
        return spec.train_x[:len(noise)].clone()
    return draw


def noise_images(noise, labels, generator):
    return noise.clamp(-1, 1)


@pytest.fixture(scope="module")
def digits_report(spec):
    candidates = [
        Candidate("teacher/noise", "teacher", "euler", 2, noise_images),
        Candidate("teacher/real", "teacher", "heun", 35, real_images(spec)),
        Candidate("student/real", "student", "consistency", 1, real_images(spec)),
        Candidate("student/noise", "student", "consistency", 2, noise_images),
    ]
    return evaluate(spec, candidates, seed=3, progress=False, model="fake-unet")


def test_evaluate_digits_ranks_real_above_noise_with_stable_keys(digits_report):
    report = digits_report
    assert {"dataset", "model", "results", "noise_floor", "reference", "n_samples", "seed"} <= set(report)
    assert (report["dataset"], report["model"], report["n_samples"], report["seed"]) == ("digits", "fake-unet", 597, 3)
    rows = {row["name"]: row for row in report["results"]}
    for row in rows.values():
        assert {"name", "role", "sampler", "nfe", "fd", "precision", "recall", "coverage", "sec_per_sample",
                "peak_memory_bytes"} <= set(row)
        assert row["sec_per_sample"] > 0
    assert rows["teacher/real"]["fd"] < rows["teacher/noise"]["fd"] / 10
    assert rows["student/real"]["precision"] > rows["student/noise"]["precision"]
    assert best_teacher(report["results"], "fd")["name"] == "teacher/real"
    assert best_at_nfe(report["results"], "student", 2, "fd")["name"] == "student/noise"
    assert best_at_nfe(report["results"], "student", 4, "fd") is None
    teacher_speed = rows["teacher/real"]["sec_per_sample"]
    assert rows["student/real"]["speedup"] == pytest.approx(teacher_speed / rows["student/real"]["sec_per_sample"])
    assert "speedup" not in rows["teacher/noise"]
    assert 0 < report["noise_floor"]["fd"] < rows["teacher/noise"]["fd"] / 10
    assert json.loads(json.dumps(report)) == report


def test_format_table_lists_teachers_first_and_the_noise_floor(digits_report):
    table = format_table(digits_report)
    print("\n" + table)
    lines = table.splitlines()
    assert "FD-digits" in lines[2] and "x floor" in lines[2] and "speedup" in lines[2]
    names = [line.split("|")[1].strip() for line in lines[4:]]
    assert names == ["teacher/noise", "teacher/real", "student/real", "student/noise",
                     "real data (noise floor, n=597)"]
    header = [cell.strip() for cell in lines[2].split("|")]
    floor_row = [cell.strip() for cell in lines[-1].split("|")]
    assert floor_row[header.index("x floor")] == "1"


def test_write_json_round_trips(digits_report, tmp_path):
    path = tmp_path / "out" / "report.json"
    write_json(digits_report, path)
    assert json.loads(path.read_text()) == digits_report
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_evaluate_gives_every_candidate_the_same_noise_and_labels(spec):
    seen = []

    def recording(noise, labels, generator):
        seen.append((noise.clone(), labels.clone(), torch.rand(3, generator=generator)))
        return spec.train_x[:len(noise)].clone()

    def by_class(shift):
        firsts = torch.stack([spec.train_x[spec.train_y == c][0] for c in range(10)])
        return lambda noise, labels, generator: firsts[(labels + shift) % 10]

    candidates = [Candidate("a", "teacher", "heun", 10, recording), Candidate("b", "student", "cm", 1, recording),
                  Candidate("right", "student", "cm", 1, by_class(0)),
                  Candidate("wrong", "student", "cm", 1, by_class(1))]
    report = evaluate(spec, candidates, n_samples=300, conditional=True, progress=False, timing_repeats=1)
    first_noise, first_labels, first_draw = seen[0]
    assert first_noise.shape == (300, 1, 8, 8) and set(first_labels.tolist()) == set(range(10))
    for noise, labels, draw in seen[1:]:
        assert torch.equal(noise[:len(first_noise)], first_noise[:len(noise)])
        assert torch.equal(labels[:len(first_labels)], first_labels[:len(labels)])
        assert torch.equal(draw, first_draw)
    rows = {row["name"]: row for row in report["results"]}
    assert rows["right"]["class_accuracy"] > 0.95 and rows["wrong"]["class_accuracy"] < 0.05
    assert report["noise_floor"]["n"] == 300


def test_evaluate_rejects_bad_candidates_and_outputs(spec):
    good = Candidate("a", "teacher", "heun", 10, noise_images)
    with pytest.raises(ConfigError, match="unique"):
        evaluate(spec, [good, good], progress=False)
    with pytest.raises(ConfigError, match="role"):
        evaluate(spec, [Candidate("a", "teachr", "heun", 10, noise_images)], progress=False)
    with pytest.raises(ConfigError, match="nfe"):
        evaluate(spec, [Candidate("a", "teacher", "heun", 0, noise_images)], progress=False)
    with pytest.raises(DataError, match="candidate 'flat'"):
        evaluate(spec, [Candidate("flat", "student", "cm", 1, lambda n, y, g: n.flatten(1))], progress=False)
    unlabelled = DatasetSpec(name="blobs", data_shape=(2,), train_x=torch.zeros(10, 2), ref_x=torch.zeros(10, 2))
    with pytest.raises(DataError, match="no classes"):
        evaluate(unlabelled, [good], conditional=True, progress=False)


def test_evaluate_two_d_with_exact_endpoint():
    pytest.importorskip("fewstep.eval.toy")
    means = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    mixture = GaussianMixture(torch.tensor([0.5, 0.5]), means, torch.tensor([0.01, 0.01]))
    generator = torch.Generator().manual_seed(0)
    dataset = DatasetSpec(name="two", data_shape=(2,), train_x=mixture.sample(2000, generator).float(),
                          ref_x=mixture.sample(1000, generator).float(), analytic=mixture,
                          log_prob=mixture.log_prob, modes=Modes(means, torch.tensor([0.1, 0.1]), torch.ones(2) / 2))

    def exact(noise, labels):  # a deterministic noise -> data map with the data's law, up to a tiny correlation
        mode = ((noise[:, 0] * 1000).floor() % 2).long()
        return means[mode] + 0.1 * noise

    candidates = [Candidate("teacher/exact", "teacher", "heun", 20, lambda n, y, g: exact(n, y)),
                  Candidate("student/shifted", "student", "consistency", 1,
                            lambda n, y, g: exact(n, y) + torch.tensor([0.0, 0.5])),
                  Candidate("student/one_mode", "student", "consistency", 1,
                            lambda n, y, g: means[1] + 0.1 * n)]
    report = evaluate(dataset, candidates, n_samples=1000, exact_endpoint=exact, endpoint_tolerance=1e-4,
                      progress=False, timing_repeats=1)
    rows = {row["name"]: row for row in report["results"]}
    for row in rows.values():
        assert {"nll", "modes_covered", "swd", "flow_map_error", "speedup" if row["role"] == "student" else "nfe"} \
            <= set(row)
    assert rows["teacher/exact"]["flow_map_error"] == 0.0
    assert rows["student/shifted"]["flow_map_error"] == pytest.approx(0.5)
    assert rows["teacher/exact"]["nll"] < rows["student/shifted"]["nll"]
    assert rows["teacher/exact"]["modes_covered"] == 2 and rows["student/one_mode"]["modes_covered"] == 1
    assert report["noise_floor"]["exact_endpoint_error"] == 1e-4 and "swd" in report["noise_floor"]
    assert report["reference"]["nll"] == pytest.approx(float(-mixture.log_prob(dataset.ref_x).mean()), rel=1e-6)
    table = format_table(report)
    assert "modes" in table and "flow-map err" in table and "2/2" in table


def test_time_sampler_takes_the_median_per_sample():
    calls = []

    def draw():
        calls.append(1)
        return torch.zeros(64, 2)

    assert time_sampler(draw, 64, warmup=2, repeats=3) > 0
    assert len(calls) == 5
    with pytest.raises(DataError, match="64 samples"):
        time_sampler(lambda: torch.zeros(10, 2), 64)
    with pytest.raises(ConfigError, match="repeats"):
        time_sampler(draw, 64, repeats=0)


def test_peak_memory_counts_live_tensor_bytes():
    assert peak_memory(lambda: torch.ones(20_000_000)) == 80_000_000
    assert peak_memory(lambda: torch.ones(10)) == 40

    def two_alive_at_most():  # a and b, then b and c: two 4 MB tensors at the peak, never three
        a = torch.ones(1000, 1000)
        b = a * 2
        del a
        c = b + 1
        return c[:10]  # a view keeps c's storage alive, it does not add one

    assert 8_000_000 <= peak_memory(two_alive_at_most) < 8_000_000 + 64  # + Python-scalar operands


def test_plots_write_non_empty_pngs(digits_report, spec, tmp_path):
    plots.sample_grid(spec.ref_x[:20], tmp_path / "grid.png", nrow=5)
    plots.compare_grids({"teacher": spec.ref_x[:16], "student": spec.train_x[:16]}, tmp_path / "compare.png")
    points = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    plots.scatter_2d({"teacher": points, "student": points * 0.5}, tmp_path / "scatter.png", reference=points)
    plots.quality_vs_nfe(digits_report, tmp_path / "fd.png")
    for name in ("grid", "compare", "scatter", "fd"):
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.png", "fd.png", "grid.png", "scatter.png"]
    with pytest.raises(DataError, match="shape"):
        plots.sample_grid(torch.zeros(4, 8, 8), tmp_path / "bad.png")
    with pytest.raises(DataError, match=r"\(N, 2\)"):
        plots.scatter_2d({"bad": torch.zeros(5, 3)}, tmp_path / "bad.png")


def test_panels_wrap_into_rows_and_leave_empty_places(spec, tmp_path):
    from PIL import Image

    one_row = {"a": spec.ref_x[:10], "b": spec.ref_x[10:20], "c": spec.ref_x[20:30], "d": spec.ref_x[30:40]}
    plots.compare_grids(one_row, tmp_path / "row.png", nrow=10)
    plots.compare_grids({"a": spec.ref_x[:10], "gap": None, "c": spec.ref_x[20:30], "d": spec.ref_x[30:40]},
                        tmp_path / "wrapped.png", nrow=10, columns=2)
    row, wrapped = Image.open(tmp_path / "row.png").size, Image.open(tmp_path / "wrapped.png").size
    assert wrapped[0] == row[0] // 2 and wrapped[1] == 2 * row[1]  # two rows of two panels
    points = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    plots.scatter_2d({"a": points, "gap": None, "c": points}, tmp_path / "scatter.png", columns=2)
    assert Image.open(tmp_path / "scatter.png").size[1] > Image.open(tmp_path / "scatter.png").size[0]
    with pytest.raises(DataError, match="at least one"):
        plots.compare_grids({"gap": None}, tmp_path / "none.png")


def _row(role: str, name: str, nfe: int, fd: float) -> dict:
    return {"role": role, "name": name, "nfe": nfe, "fd": fd, "sec_per_sample": 1e-4}


def test_finest_teacher_is_the_best_row_at_the_largest_teacher_nfe():
    results = [_row("teacher", "teacher/heun@16", 16, 2.3), _row("teacher", "teacher/heun@64", 64, 3.6),
               _row("teacher", "teacher/dpmpp_2m@64", 64, 3.5), _row("student", "student/scd@2", 2, 4.3)]
    assert best_teacher(results, "fd")["name"] == "teacher/heun@16"
    assert finest_teacher(results, "fd")["name"] == "teacher/dpmpp_2m@64"
    assert finest_teacher([_row("student", "student/scd@2", 2, 4.3)], "fd") is None


def test_report_gives_student_ratios_to_the_teachers_best_and_finest_solve():
    results = [_row("teacher", "teacher/heun@16", 16, 2.0), _row("teacher", "teacher/heun@64", 64, 4.0),
               _row("student", "student/scd@2", 2, 5.0)]
    report = {"dataset": "digits", "model": "m", "n_samples": 3000, "seed": 0, "noise_floor": {"fd": 1.0},
              "results": results, "quality_metric": "fd",
              "speedup_reference": "teacher/heun@64", "best_teacher": "teacher/heun@16"}
    student = SimpleNamespace(method="scd", name="scd")
    text = report_markdown(report, student)
    assert "Teacher's ODE solved most finely: teacher/heun@64 with fd = 4." in text
    assert "fd = 5 (2.50x the teacher's best, 1.25x its finest solve)" in text
    # When the finest solve is the best, there is one reference and one ratio.
    results[1]["fd"] = 1.0
    text = report_markdown(report, student)
    assert "solved most finely" not in text
    assert "fd = 5 (5.00x the teacher's best)" in text


def test_ratios_to_teacher_are_of_the_named_metric():
    results = [_row("teacher", "teacher/heun@16", 16, 2.0), _row("teacher", "teacher/heun@64", 64, 4.0),
               _row("student", "student/scd@2", 2, 5.0)]
    assert ratios_to_teacher(results[2], results, "fd") == " (2.50x the teacher's best, 1.25x its finest solve)"
    swd = [row | {"swd": 1 / row["fd"]} for row in results]  # ranked by swd, the finest solve is also the best
    assert ratios_to_teacher(swd[2], swd, "swd") == " (0.80x the teacher's best)"
    assert ratios_to_teacher(results[2], results[2:], "fd") == ""  # no teacher rows
