"""The public API end to end on tiny budgets: teachers (analytic, MLP, UNet), distill, save/load, evaluate."""

import pytest
import torch

import fewstep
from fewstep.api import Student, Teacher
from fewstep.data.spec import DatasetSpec


def test_unet_teacher_trains_saves_and_reloads(tmp_path):
    teacher = Teacher.train("digits", backbone="unet", backbone_args={"channels": 16}, steps=5, batch_size=32,
                            progress=False)
    labels = torch.arange(4)
    x = teacher.sample(4, "euler", 2, label=labels)
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    teacher.save(tmp_path / "t")
    again = Teacher.load(tmp_path / "t")
    assert torch.equal(again.sample(4, "euler", 2, label=labels), x)


def test_distill_save_load_sample_and_evaluate_on_the_exact_ring(tmp_path):
    teacher = Teacher.analytic("ring8")
    student = fewstep.distill(teacher, "cd", steps=20, lr=1e-3, student_backbone_args={"width": 32, "depth": 1},
                              progress=False)
    student.save(tmp_path / "s")
    loaded = Student.load(tmp_path / "s")
    assert torch.equal(loaded.sample(16, nfe=2, seed=3), student.sample(16, nfe=2, seed=3))
    report = fewstep.evaluate_models(teacher, [loaded], teacher_nfe=(2,), teacher_solvers=("euler",),
                                     n_samples=200, progress=False)
    rows = {row["name"]: row for row in report["results"]}
    assert {"teacher/euler@2", "teacher/heun@35", "student/cd@1", "student/cd@2", "student/cd@4"} <= set(rows)
    for row in rows.values():
        assert {"nfe", "nll", "modes_covered", "swd", "sec_per_sample", "flow_map_error"} <= set(row)
    assert report["speedup_reference"] == "teacher/heun@35" and rows["student/cd@2"]["speedup"] > 0
    assert report["noise_floor"]["exact_endpoint_error"] < 1e-3


def test_a_student_of_an_outside_teacher_reloads_without_a_builtin_dataset(tmp_path):
    """Students distilled from a teacher with no built-in dataset (a diffusers model) name an outside dataset;
    they reload with an empty dataset of the model's shape and the saved normalisation."""
    teacher = Teacher.analytic("ring8")
    student = fewstep.distill(teacher, "cd", steps=2, student_backbone_args={"width": 16, "depth": 1},
                              progress=False)
    outside = DatasetSpec("diffusers:some/model", (2,), torch.empty(0, 2), torch.empty(0, 2),
                          normalisation={"scale": 2.0})
    Student(student.denoiser, "cd", student.sampling, outside).save(tmp_path / "s")
    loaded = Student.load(tmp_path / "s")
    assert loaded.dataset.name == "diffusers:some/model" and loaded.dataset.data_shape == (2,)
    assert loaded.dataset.normalisation == {"scale": 2.0}
    assert torch.equal(loaded.sample(8, nfe=2, seed=1), student.sample(8, nfe=2, seed=1))


def test_guidance_conventions_through_the_teacher():
    teacher = Teacher.train("digits", backbone_args={"width": 32, "depth": 1}, steps=3, batch_size=16,
                            progress=False)
    x, s, labels = torch.randn(8, 1, 8, 8), torch.full((8,), 2.0), torch.arange(8)
    assert torch.equal(teacher.guided(x, s, labels), teacher.denoiser(x, s, labels))  # scale 1: the plain model
    cfg = teacher.with_guidance(3.0, "cfg").guided(x, s, labels)
    plus_one = teacher.with_guidance(2.0, "cfg_plus_one").guided(x, s, labels)
    assert torch.allclose(cfg, plus_one, atol=1e-6)
    assert not torch.allclose(cfg, teacher.denoiser(x, s, labels), atol=1e-4)


def test_a_bad_student_or_teacher_backbone_setting_is_one_config_error_naming_it():
    from fewstep.api import build_method
    from fewstep.errors import ConfigError
    from fewstep.train.teacher import train_teacher

    teacher = Teacher.analytic("ring8")
    with pytest.raises(ConfigError, match=r"student_backbone_args: .*unexpected keyword argument 'widht'"):
        build_method(teacher, "cd", student_backbone_args={"widht": 64})
    with pytest.raises(ConfigError, match=r"student_backbone_args: time_frequencies must be \(low, high\)"):
        build_method(teacher, "scd", student_backbone_args={"time_frequencies": [20.0, 0.1]})
    with pytest.raises(ConfigError, match=r"teacher backbone_args for 'mlp': time_frequencies must be"):
        train_teacher(torch.zeros(4, 2), None, "mlp", {"data_shape": [2], "time_frequencies": [0.0, 1.0]})


def test_an_analytic_teacher_owns_its_mixture_so_moving_it_leaves_the_datasets_metrics_alone():
    """Training moves the teacher to the training device; the dataset's ``log_prob`` (the evaluation's NLL) must
    stay where the samples are measured. Here a dtype change stands in for a move to a GPU."""
    dataset = fewstep.load_dataset("ring8")
    teacher = Teacher.analytic(dataset)
    assert teacher.denoiser is not dataset.analytic
    teacher.denoiser.to(torch.float32)
    assert dataset.analytic.means.dtype == torch.float64
    x = torch.randn(4, 2, dtype=torch.float64)
    assert torch.equal(dataset.log_prob(x), Teacher.analytic(dataset).denoiser.log_prob(x))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_distill_on_a_missing_device_is_one_config_error():
    from fewstep.errors import ConfigError

    with pytest.raises(ConfigError, match="device 'cuda' is not available"):
        fewstep.distill(Teacher.analytic("ring8"), "cd", steps=1, device="cuda", progress=False)
