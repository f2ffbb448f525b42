"""The text-to-image job end to end on tiny pipelines built from configs (random weights, no download): a prompt
file -> the pipeline's own text encoders (cached) -> a LoRA student distilled on latents -> export -> diffusers
loads it -> the same images as fewstep's own sampling."""

import dataclasses
import json
import math
import shutil
import warnings

import diffusers
import pytest
import torch

import fewstep
from fewstep import hub
from fewstep.data.prompts import read_prompts
from fewstep.errors import ConfigError, DataError
from fewstep.eval.clip import clip_frechet_distance, clip_score
from fewstep.hub import pipelines
from fewstep.models.denoiser import BoundaryDenoiser
from fewstep.nets.diffusers_backbone import pack_patches, unpack_patches
from tiny_pipelines import build, clip_model

PROMPTS = "a cat\na dog\n\na red fox\n"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: build(kind, root / kind) for kind in ("sd", "sdxl", "sd3", "flux")}


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def test_prompt_files_of_every_format_read_the_same_prompts(tmp_path):
    (tmp_path / "p.csv").write_text('id,caption\n1,a cat\n2,"a dog, brown"\n3,\n')
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n\n{"text": "a dog, brown"}\n')
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog, brown  \n")
    for name in ("p.csv", "p.jsonl", "p.txt"):
        assert read_prompts(tmp_path / name) == ["a cat", "a dog, brown"], name


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "\n \n", "holds no prompt"),
    ("bytes.txt", b"\xff\xfe\x00bad", "cannot read"),
    ("prompts.yaml", "- a cat\n", "use a .txt"),
    ("nocol.csv", "id,label\n1,cat\n", "no prompt/caption/text column"),
    ("bad.jsonl", '{"prompt": "a cat"}\nnot json\n', "line 2 is not JSON"),
    ("nokey.jsonl", '{"label": "a cat"}\n', "line 1 has no string"),
    ("missing.txt", None, "cannot read"),
])
def test_a_bad_prompt_file_is_one_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_prompts(path)


def test_a_second_run_with_the_same_prompts_encodes_none(folders, prompt_file, tmp_path):
    start = pipelines.ENCODED["prompts"]
    first = fewstep.Teacher.from_pipeline(folders["sd"], prompt_file)
    encoded = pipelines.ENCODED["prompts"] - start
    second = fewstep.Teacher.from_pipeline(folders["sd"], prompt_file)
    assert encoded == 3 + 1  # three prompts and the null (empty) prompt
    assert pipelines.ENCODED["prompts"] - start == encoded  # the second run read the cache
    assert torch.equal(first.dataset.conditions.embeddings, second.dataset.conditions.embeddings)
    assert torch.equal(first.null.embeddings, second.null.embeddings)
    other = tmp_path / "other.txt"
    other.write_text("a cat\na bird\n")
    fewstep.Teacher.from_pipeline(folders["sd"], other)
    assert pipelines.ENCODED["prompts"] - start == encoded + 3  # other prompts: encoded anew


def test_a_prompt_longer_than_the_encoder_takes_is_truncated_with_a_warning_naming_it(folders, tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("a cat\n" + "a very long prompt about many things\n")
    with pytest.warns(UserWarning, match=r"prompt 2 \('a very long.*more than the text encoder's 16"):
        fewstep.Teacher.from_pipeline(folders["sd"], path)


def test_a_pipeline_folder_missing_a_component_is_refused_before_anything_is_written(folders, prompt_file,
                                                                                       tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folders["sdxl"], broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ConfigError, match="missing its text_encoder_2"):
        fewstep.Teacher.from_pipeline(broken, prompt_file)
    assert not (tmp_path / "cache" / "prompts").exists()
    with pytest.raises(ConfigError, match="not a diffusers pipeline folder"):
        fewstep.Teacher.from_pipeline(tmp_path, prompt_file)


def test_a_data_method_without_images_names_what_to_give(folders, prompt_file):
    teacher = fewstep.Teacher.from_pipeline(folders["sd"], prompt_file)
    with pytest.raises(DataError, match=r"trains on real samples.*captioned images.*data-free"):
        fewstep.distill(teacher, "cd", steps=1, batch_size=2, progress=False)


def distilled(folder, prompt_file, rank: int = 4, resolution: int | None = None):
    teacher = fewstep.Teacher.from_pipeline(folder, prompt_file, guidance_scale=2.0, resolution=resolution)
    student = fewstep.distill(teacher, "diff_instruct", steps=2, batch_size=2, lr=1e-2, progress=False,
                              lora_rank=rank, method_args={"fake_warmup": 0})
    return teacher, student


def student_latents(student, cond, nfe: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, *student.dataset.data_shape), generator=generator)
    return student.sample(1, nfe=nfe, noise=noise, generator=generator, cond=cond)


def pipeline_latents(pipe, prompt: str, nfe: int, seed: int) -> torch.Tensor:
    return pipe(prompt, num_inference_steps=nfe, guidance_scale=1.0, height=16, width=16, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_the_exported_pipeline_and_lora_give_the_students_own_images(folders, prompt_file, tmp_path, kind):
    """prompts -> cached embeddings -> LoRA distillation -> export (full pipeline, and LoRA + scheduler) ->
    ``DiffusionPipeline.from_pretrained`` (+ ``load_lora_weights``) -> the student's latents for the same prompt and
    seed, to float32 round-off."""
    teacher, student = distilled(folders[kind], prompt_file)
    network = student.denoiser.backbone.model
    trainable = {name for name, p in network.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in name for name in trainable)
    hub.export_student(student, tmp_path / "pipe", "diffusers")
    hub.export_student(student, tmp_path / "lora", "lora")
    full = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    with_lora = diffusers.DiffusionPipeline.from_pretrained(folders[kind])
    with_lora.load_lora_weights(tmp_path / "lora")
    with_lora.scheduler = hub.FewstepScheduler.from_pretrained(tmp_path / "lora", subfolder="scheduler")
    plain = diffusers.DiffusionPipeline.from_pretrained(folders[kind])
    plain.scheduler = hub.FewstepScheduler.from_pretrained(tmp_path / "lora", subfolder="scheduler")
    cond = teacher.dataset.conditions[1:2]  # "a dog"
    for nfe in (1, 2, 4):
        ours = student_latents(student, cond, nfe, seed=nfe)
        for name, pipe in (("full pipeline", full), ("pipeline + LoRA", with_lora)):
            diff = (pipeline_latents(pipe, "a dog", nfe, seed=nfe) - ours).abs().max().item()
            print(f"{kind} {name} vs fewstep at {nfe} NFE: max abs diff {diff:.2e}")
            assert diff < 1e-5
        without = (pipeline_latents(plain, "a dog", nfe, seed=nfe) - ours).abs().max().item()
        assert without > 1e-3  # the LoRA matters: the base network alone gives other latents
    images = full("a dog", num_inference_steps=2, guidance_scale=1.0, height=16, width=16, output_type="pt",
                  generator=torch.Generator().manual_seed(2)).images
    decoded = pipelines.LatentCodec(teacher.pipeline.vae).decode(student_latents(student, cond, 2, seed=2))
    assert (images - (decoded / 2 + 0.5).clamp(0, 1)).abs().max().item() < 1e-5


def lora_pipeline(folder, lora):
    pipe = pipelines.load_pipeline(folder)
    pipe.load_lora_weights(lora)
    pipe.scheduler = hub.FewstepScheduler.from_pretrained(lora, subfolder="scheduler")
    return pipe


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_an_exported_transformer_pipeline_and_lora_give_the_students_own_images(folders, prompt_file, tmp_path, kind):
    """SD3-like and FLUX-like pipelines feed their latents to the network unscaled and do not pass their generator to
    the scheduler: started from ``pipeline_latents`` (the student's first state, packed for FLUX) with torch's global
    generator seeded as for the student, the exported pipeline and the base pipeline with the LoRA give the student's
    latents and images to float32 round-off."""
    teacher, student = distilled(folders[kind], prompt_file, resolution=16)  # FLUX's config has no image size
    hub.export_student(student, tmp_path / "pipe", "diffusers")
    hub.export_student(student, tmp_path / "lora", "lora")
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3" else {}  # the tiny SD3 has no T5
    full = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "pipe", **no_t5)
    with_lora = lora_pipeline(folders[kind], tmp_path / "lora")
    plain = pipelines.load_pipeline(folders[kind])
    plain.scheduler = with_lora.scheduler
    shape, cond = teacher.dataset.data_shape, teacher.dataset.conditions[1:2]  # "a dog"

    def run(pipe, nfe: int, output_type: str = "latent") -> torch.Tensor:
        torch.manual_seed(nfe)
        latents = pipelines.pipeline_latents(pipe, torch.randn((1, *shape)), nfe)
        out = pipe("a dog", num_inference_steps=nfe, guidance_scale=1.0, height=16, width=16, latents=latents,
                   output_type=output_type).images
        return unpack_patches(out, shape) if kind == "flux" and output_type == "latent" else out

    for nfe in (1, 2, 4):
        torch.manual_seed(nfe)
        ours = student.sample(1, nfe=nfe, noise=torch.randn((1, *shape)), generator=torch.default_generator, cond=cond)
        for name, pipe in (("full pipeline", full), ("pipeline + LoRA", with_lora)):
            diff = (run(pipe, nfe) - ours).abs().max().item()
            print(f"{kind} {name} vs fewstep at {nfe} NFE: max abs diff {diff:.2e}")
            assert diff < 1e-5
        assert (run(plain, nfe) - ours).abs().max().item() > 1e-3  # the LoRA matters
        torch.manual_seed(nfe)
        noise = torch.randn((1, *shape))
        unscaled = full("a dog", num_inference_steps=nfe, guidance_scale=1.0, height=16, width=16,
                        output_type="latent", latents=noise if kind == "sd3" else pack_patches(noise)).images
        off = (unscaled if kind == "sd3" else unpack_patches(unscaled, shape)) - ours
        print(f"{kind} started from unscaled noise at {nfe} NFE: max abs diff {off.abs().max():.3g} (latents' rms "
              f"{ours.pow(2).mean().sqrt():.3g})")
        assert off.abs().max().item() > 1e-2  # what latents=pipeline_latents(...) is for
    torch.manual_seed(2)
    decoded = pipelines.LatentCodec(teacher.pipeline.vae).decode(
        student.sample(1, nfe=2, noise=torch.randn((1, *shape)), generator=torch.default_generator, cond=cond))
    assert (run(full, 2, "pt") - (decoded / 2 + 0.5).clamp(0, 1)).abs().max().item() < 1e-5


def test_lora_rank_must_be_positive(folders, prompt_file):
    teacher = fewstep.Teacher.from_pipeline(folders["sd"], prompt_file)
    with warnings.catch_warnings(), pytest.raises(ConfigError, match="lora_rank must be a positive"):
        fewstep.distill(teacher, "diff_instruct", steps=1, batch_size=2, progress=False, lora_rank=0)


def image_folder(folder, count: int = 4):
    from PIL import Image

    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = (torch.rand(20, 24, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"image{i}.png")
        if i % 2 == 0:
            (folder / f"image{i}.txt").write_text(["a cat", "a dog"][i // 2 % 2])
    return folder


def test_lcm_lora_on_captioned_images_exports_a_pipeline_that_gives_its_images(folders, tmp_path):
    """The consistency family on a diffusers teacher: LCM-LoRA (no guidance input, the teacher guided at one weight,
    consistency coefficients around the teacher's own prediction) on a captioned image folder, whose latents are
    encoded once."""
    images = image_folder(tmp_path / "images")
    start = dict(pipelines.ENCODED)
    teacher = fewstep.Teacher.from_pipeline(folders["sd"], images=images, guidance_scale=3.0)
    assert pipelines.ENCODED["images"] - start["images"] == 4
    assert teacher.dataset.train_x.shape == (4, 4, 8, 8) and len(teacher.dataset.train_y) == 4
    fewstep.Teacher.from_pipeline(folders["sd"], images=images)
    assert pipelines.ENCODED["images"] - start["images"] == 4  # the latents came from the cache
    student = fewstep.distill(teacher, "lcm", steps=2, batch_size=2, lr=1e-2, progress=False, lora_rank=4)
    assert isinstance(student.denoiser, BoundaryDenoiser)
    top = float(teacher.denoiser.path.ve_sigma(torch.tensor(999.0)))  # the SD schedule's last level, about 14.6
    assert 14 < top < 15 and student.sampling[1].sigmas[0] == pytest.approx(top)  # not EDM's 80
    x = torch.randn(2, 4, 8, 8)
    level = torch.full((2,), student.denoiser.sigma_min)
    assert torch.equal(student.denoiser(x, level, teacher.dataset.train_y[:2]), x)  # f(x, s_min) = x
    hub.export_student(student, tmp_path / "pipe", "diffusers")
    hub.export_student(student, tmp_path / "lora", "lora")
    full = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    with_lora = diffusers.DiffusionPipeline.from_pretrained(folders["sd"])
    with_lora.load_lora_weights(tmp_path / "lora")
    with_lora.scheduler = hub.FewstepScheduler.from_pretrained(tmp_path / "lora", subfolder="scheduler")
    for nfe in (1, 4):
        ours = student_latents(student, teacher.dataset.train_y[:1], nfe, seed=nfe)  # "a cat"
        lora = (pipeline_latents(with_lora, "a cat", nfe, seed=nfe) - ours).abs().max().item()
        fused = (pipeline_latents(full, "a cat", nfe, seed=nfe) - ours).abs().max().item()
        scale = ours.abs().max().item()
        print(f"LCM-LoRA vs fewstep at {nfe} NFE (latents up to {scale:.1f}): pipeline + LoRA {lora:.2e}, full "
              f"pipeline (LoRA fused into the weights) {fused:.2e}")
        assert lora < 1e-5 and fused < 1e-6 * max(scale, 1.0)  # fusing rounds each weight once


def test_a_corrupt_or_missing_image_is_one_clear_error_before_anything_is_written(folders, tmp_path):
    images = image_folder(tmp_path / "images", count=2)
    (images / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read the image .*broken.png"):
        fewstep.Teacher.from_pipeline(folders["sd"], images=images)
    assert not (tmp_path / "cache" / "latents").exists()
    (images / "none").mkdir()
    with pytest.raises(DataError, match="holds no"):
        fewstep.Teacher.from_pipeline(folders["sd"], images=images / "none")


def test_fewstep_distill_from_a_pipeline_folder_and_a_prompt_file(folders, prompt_file, tmp_path, capsys):
    """The command-line job, ``fewstep distill teacher.source=PIPELINE data.prompts=FILE method=...
    student.lora_rank=8``, writes the LoRA, the pipeline and a report comparing the student with the teacher on
    the same prompts and noise."""
    from fewstep.cli import main

    out = tmp_path / "run"
    encoder = clip_model(tmp_path / "clip")
    code = main(["distill", f"teacher.source={folders['sd']}", f"data.prompts={prompt_file}", "method=diff_instruct",
                 "student.lora_rank=8", "train.steps=2", "train.batch_size=2", "method_args.fake_warmup=0",
                 "eval.teacher_nfe=[8]", "eval.n_samples=3", f"eval.encoder={encoder}", f"out={out}", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| NFE | latent RMSE | pixel RMSE |" in printed and "CLIP score (local encoder)" in printed
    report = json.loads((out / "report.json").read_text())
    assert [row["nfe"] for row in report["results"]] == [1, 2, 4] and report["prompts"] == 3
    assert all(math.isfinite(row[key]) for row in report["results"] for key in ("latent_rmse", "clip_fd", "clip_score"))
    assert {"lora", "pipeline", "report.json", "report.md", "samples.png"} <= {p.name for p in out.iterdir()}
    pipe = diffusers.DiffusionPipeline.from_pretrained(out / "pipeline")
    assert isinstance(pipe.scheduler, hub.FewstepScheduler)


@pytest.mark.parametrize("overrides, message", [
    (["data.prompts=PROMPTS", "method=cd"], "method cd trains on real data: give data.images"),
    (["method=diff_instruct"], "needs data.prompts"),
    (["data.prompts=PROMPTS", "student.lora_rank=0"], "student.lora_rank must be a positive"),
    (["data.prompts=EMPTY"], "holds no prompt"),
    (["data.images=NOWHERE"], "no image folder"),
])
def test_a_bad_text_job_exits_2_with_one_line_and_writes_nothing(folders, prompt_file, tmp_path, capsys,
                                                                 overrides, message):
    from fewstep.cli import main

    (tmp_path / "empty.txt").write_text("\n")
    names = {"PROMPTS": str(prompt_file), "EMPTY": str(tmp_path / "empty.txt"), "NOWHERE": str(tmp_path / "nowhere")}
    overrides = [o.split("=")[0] + "=" + names.get(o.split("=")[1], o.split("=")[1]) for o in overrides]
    out = tmp_path / "run"
    code = main(["distill", f"teacher.source={folders['sd']}", *overrides, f"out={out}", "--quiet"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and len(error.splitlines()) == 1, error
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_text_job_keys_without_a_pipeline_teacher_are_refused(tmp_path, capsys):
    from fewstep.cli import main

    code = main(["distill", "data.prompts=p.txt", f"out={tmp_path / 'run'}", "--quiet"])
    assert code == 2 and "teacher.source to a diffusers pipeline folder" in capsys.readouterr().err


def test_clip_score_and_distance_are_what_they_say():
    unit = torch.nn.functional.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert clip_score(unit, unit) == pytest.approx(100.0)
    assert clip_score(unit, -unit) == 0.0  # negative similarity counts as none
    assert clip_frechet_distance(unit, unit) == pytest.approx(0.0, abs=1e-9)
    assert clip_frechet_distance(unit, unit + 0.5) == pytest.approx(8 * 0.25, rel=1e-6)  # a shift of the mean only


def test_a_student_starts_as_its_diffusers_teacher(folders, prompt_file):
    """The student is the teacher's network read the teacher's way (path, prediction, timesteps), not an EDM
    preconditioner around an eps network: before training it answers as the teacher; a consistency student equals
    it wherever the noise dominates, and is the identity at its lowest level."""
    teacher = fewstep.Teacher.from_pipeline(folders["sd"], prompt_file)
    x, cond = torch.randn(3, 4, 8, 8), teacher.dataset.conditions
    with torch.no_grad():
        for name, level, tolerance in (("diff_instruct", 2.0, 1e-6), ("lcm", 14.0, 1e-2)):
            student = fewstep.build_method(teacher, name).student
            s = torch.full((3,), level)
            reference = teacher.denoiser(x, s, cond)
            gap = (student(x, s, cond) - reference).abs().max() / reference.abs().max()
            assert gap <= tolerance, (name, gap)
        assert torch.equal(student(x, torch.full((3,), student.sigma_min), cond), x)


def test_a_saved_dataset_gives_the_same_prompts_and_images_as_files(folders, tmp_path):
    """A dataset saved with the ``datasets`` library is a prompt source (its prompt column) and an image source (its
    ``image`` column, captions from its prompt column): the same prompts, captions and latents as the files."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    datasets.Dataset.from_dict({"text": ["a cat", "  ", "a dog"], "n": [1, 2, 3]}).save_to_disk(tmp_path / "prompts")
    assert read_prompts(tmp_path / "prompts") == ["a cat", "a dog"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["a red fox"]})}).save_to_disk(
        tmp_path / "split")
    assert read_prompts(tmp_path / "split") == ["a red fox"]
    files = image_folder(tmp_path / "images")
    pictures = [Image.open(f) for f in sorted(files.glob("*.png"))]
    captions = ["a cat", "", "a dog", ""]  # as image_folder writes them
    datasets.Dataset.from_dict({"image": pictures, "caption": captions}, features=datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string")})).save_to_disk(tmp_path / "saved")
    from_files = fewstep.Teacher.from_pipeline(folders["sd"], images=files)
    from_saved = fewstep.Teacher.from_pipeline(folders["sd"], images=tmp_path / "saved")
    assert from_saved.dataset.prompts == captions == from_files.dataset.prompts
    assert torch.allclose(from_saved.dataset.train_x, from_files.dataset.train_x, atol=1e-6)
    assert torch.equal(from_saved.dataset.train_y.embeddings, from_files.dataset.train_y.embeddings)


@pytest.mark.parametrize("columns, message", [
    ({"n": [1]}, "no prompt/caption/text column"),
    ({"text": ["", " "]}, "holds no prompt"),
])
def test_a_bad_saved_prompt_dataset_is_one_clear_error(tmp_path, columns, message):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict(columns).save_to_disk(tmp_path / "saved")
    with pytest.raises(DataError, match=message):
        read_prompts(tmp_path / "saved")


def test_a_saved_dataset_without_images_with_a_corrupt_one_or_without_a_train_split_is_refused(folders, tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"caption": ["a cat"]}).save_to_disk(tmp_path / "no_images")
    with pytest.raises(DataError, match="has no image column"):
        fewstep.Teacher.from_pipeline(folders["sd"], images=tmp_path / "no_images")
    datasets.Dataset.from_dict({"image": [{"bytes": b"not a png", "path": None}]}, features=datasets.Features(
        {"image": datasets.Image()})).save_to_disk(tmp_path / "corrupt")
    with pytest.raises(DataError, match="the image in row 0 cannot be read"):
        fewstep.Teacher.from_pipeline(folders["sd"], images=tmp_path / "corrupt")
    assert not (tmp_path / "cache" / "latents").exists()
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(tmp_path / "test_only")
    with pytest.raises(DataError, match="no 'train' split"):
        read_prompts(tmp_path / "test_only")


def test_a_vp_pipeline_teachers_solves_and_pairs_start_at_its_last_timestep(folders, prompt_file):
    """The teacher's ODE (its samples, and the pairs DMD regresses on) starts at the SD schedule's last level (about
    14.6), never at EDM's 80, where the UNet would be read at timesteps it was never trained on; DMD then builds
    with its generator at that level."""
    from fewstep.models.denoiser import start_level

    teacher = fewstep.Teacher.from_pipeline(folders["sd"], prompt_file, guidance_scale=2.0)
    top = float(teacher.denoiser.path.ve_sigma(torch.tensor(999.0)))
    assert 14 < top < 15 and start_level(teacher.denoiser) == pytest.approx(top)
    levels = []
    hook = teacher.denoiser.register_forward_pre_hook(lambda module, args: levels.append(float(args[1].max())))
    teacher.sample(1, "heun", 3, cond=teacher.dataset.conditions[:1])
    hook.remove()
    assert levels[0] == pytest.approx(top) and max(levels) == pytest.approx(top)
    assert start_level(fewstep.Teacher.analytic("ring8").denoiser) == 80.0
    student = fewstep.distill(teacher, "dmd", steps=1, batch_size=2, progress=False, lora_rank=4,
                              method_args={"num_pairs": 4, "pair_nfe": 3})
    assert student.sampling[1].sigmas[0] == pytest.approx(top)


@pytest.mark.parametrize("method", ["meanflow", "ctm"])
def test_a_method_whose_student_needs_a_second_time_is_one_clear_error_on_a_diffusers_teacher(folders, prompt_file,
                                                                                            method):
    teacher = fewstep.Teacher.from_pipeline(folders["sd"], prompt_file)
    with pytest.raises(ConfigError, match="a DiffusersBackbone takes none"):
        fewstep.distill(teacher, method, steps=1, batch_size=2, progress=False)


NOT_ON_A_DIFFUSERS_NETWORK = {  # method -> what its one clear error names
    **dict.fromkeys(("boot", "ctm", "flow_map", "flow_map_free", "meanflow", "slam", "twinflow"), "takes none"),
    **dict.fromkeys(("rcm", "scd", "sct"), "needs an EDMDenoiser student"),
    "slimflow": "must be smaller", "tbcm": "cannot hold text conditions",
}


@pytest.mark.parametrize("name", sorted(fewstep.METHODS))
def test_every_method_runs_on_a_text_to_image_teacher_or_says_why_not(folders, prompt_file, tmp_path, name):
    """Each registered method on the tiny SD-like pipeline (prompts and captioned images, a LoRA student, two steps):
    it trains and samples finite latents, or it is one ConfigError / DataError naming why it cannot."""
    teacher = fewstep.Teacher.from_pipeline(folders["sd"], prompt_file, images=image_folder(tmp_path / "images"),
                                            guidance_scale=2.0)
    fields = {f.name for f in dataclasses.fields(fewstep.METHODS[name].Config)}
    args = {key: value for key, value in (("num_pairs", 4), ("pair_nfe", 3)) if key in fields}
    if name in NOT_ON_A_DIFFUSERS_NETWORK:
        with pytest.raises((ConfigError, DataError), match=NOT_ON_A_DIFFUSERS_NETWORK[name]):
            fewstep.distill(teacher, name, steps=2, batch_size=2, progress=False, lora_rank=4, method_args=args)
        return
    student = fewstep.distill(teacher, name, steps=2, batch_size=2, lr=1e-3, progress=False, lora_rank=4,
                              method_args=args)
    assert torch.isfinite(student.sample(2, nfe=min(student.sampling), cond=teacher.dataset.conditions[:2])).all()
