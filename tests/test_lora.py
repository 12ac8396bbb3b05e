"""network.lora_rank: the fake score and the degrading model as LoRA adapters on the frozen, shared teacher."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from disback import stages
from disback.data import load_data
from disback.errors import DisbackError
from disback.method.lora import Adapted
from disback.method.path import DegradationPath
from disback.storage.models import load_model
from disback.storage.weights import load_weights, save_weights


def test_an_adapter_shares_the_teachers_tensors_starts_as_the_teacher_and_owns_only_its_adapters(
    tiny_teacher, tmp_path
):
    teacher, _ = load_model(tiny_teacher[0])
    adapted = Adapted(teacher, rank=4)
    base = {id(p) for p in teacher.parameters()}
    own = [n for n, p in adapted.named_parameters() if id(p) not in base]
    assert own and all(".lora_" in n for n in own)  # nothing of the teacher is copied
    assert all(not p.requires_grad for p in teacher.parameters())
    x, sigma = torch.randn(16, 2), torch.rand(16) * 3
    assert torch.equal(adapted(x, sigma), teacher(x, sigma))  # zero adapters: the teacher exactly
    assert set(adapted.state_dict()) == {n for n in own}

    save_weights(adapted, tmp_path / "adapters.safetensors")
    assert set(load_file(str(tmp_path / "adapters.safetensors"))) == set(own)
    with pytest.raises(DisbackError, match="missing keys.*unexpected keys"):  # a full teacher file is not an adapter
        load_weights(adapted, tiny_teacher[0])
    wider = Adapted(load_model(tiny_teacher[0])[0], rank=8)
    with pytest.raises(DisbackError, match="shape mismatch"):
        load_weights(wider, tmp_path / "adapters.safetensors")


def test_lora_path_and_distillation_train_adapters_only_and_load_every_node_exactly(tiny_teacher, tmp_path):
    teacher_file, base_cfg = tiny_teacher
    cfg = tiny_config(network={"hidden": 64, "lora_rank": 4}, degrade={"lr": 5e-3})
    before = load_file(str(teacher_file))
    path = stages.record_path(cfg, teacher_file, tmp_path / "path", show_progress=False)
    sizes = [(path.root / n.file).stat().st_size for n in path.nodes]
    assert len(path) == cfg.degrade.nodes + 1 and max(sizes) < teacher_file.stat().st_size / 2
    nodes = [load_file(str(path.root / n.file)) for n in path.nodes]
    assert all(k.endswith(".weight") and ".lora_" in k for k in nodes[0])
    assert all(float(v.abs().max()) == 0 for k, v in nodes[0].items() if "lora_B" in k)  # node 0 is the teacher
    assert any(float(v.abs().max()) > 0 for k, v in nodes[-1].items() if "lora_B" in k)  # the adapters did train
    with pytest.raises(DisbackError, match="holds only the LoRA adapters \\(rank 4\\)"):  # not a network on its own
        load_model(path.root / path.nodes[-1].file)

    data = load_data(cfg.data, cfg.seed)
    result = stages.distill(
        cfg, data, teacher_file, DegradationPath.load(path.root), tmp_path / "run", show_progress=False
    )
    assert result["switches"] and (tmp_path / "run" / "generator.safetensors").is_file()
    fake = load_file(str(tmp_path / "run" / "fake.safetensors"))
    assert set(fake) == set(nodes[-1]) and any(not torch.equal(fake[k], nodes[-1][k]) for k in fake)
    after = load_file(str(teacher_file))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the shared teacher never moved

    baseline = stages.distill(cfg, data, teacher_file, None, tmp_path / "baseline", show_progress=False)
    assert baseline["nodes"] == 1 and set(load_file(str(tmp_path / "baseline" / "fake.safetensors"))) == set(fake)

    full = tiny_config(network={"hidden": 64})
    with pytest.raises(DisbackError, match="lora_rank=4"):
        stages.distill(
            full, data, teacher_file, DegradationPath.load(path.root), tmp_path / "mismatch", show_progress=False
        )


def test_a_lora_generator_trains_adapters_only_and_saves_the_merged_network_and_its_adapters(tiny_teacher, tmp_path):
    """network.generator_lora_rank (DMD2's LoRA generator): adapters on the teacher's own weights; the run writes the
    whole generator (adapters merged into a copy) and the adapters alone; checkpoints hold the adapters; it resumes."""
    from test_resume import interrupted, same_files

    teacher_file, _ = tiny_teacher
    cfg = tiny_config(
        network={"hidden": 64, "generator_lora_rank": 4},
        distill={"steps": 12, "sigma_g": [2.5, 0.5]},
        run={"checkpoint_every": 5, "keep": 3},
    )
    data = load_data(cfg.data, cfg.seed)
    stages.distill(cfg, data, teacher_file, None, tmp_path / "a", show_progress=False)
    teacher, _ = load_model(teacher_file)
    generator, meta = load_model(tmp_path / "a" / "generator.safetensors")
    adapters = load_file(str(tmp_path / "a" / "generator-lora.safetensors"))
    assert adapters and all(".lora_" in k for k in adapters)
    assert any(k.endswith("lora_B.default.weight") and v.abs().max() > 0 for k, v in adapters.items())  # trained
    # the merged generator is the teacher's weights plus B A, checked against the adapters by hand on one layer
    name = next(k for k in adapters if k.endswith("lora_A.default.weight")).split(".lora_A")[0]
    layer = name.removeprefix("net.denoiser.")
    a, b = adapters[f"{name}.lora_A.default.weight"], adapters[f"{name}.lora_B.default.weight"]
    want = teacher.get_submodule(layer).weight + b @ a  # lora_alpha = rank: scale 1
    torch.testing.assert_close(generator.denoiser.get_submodule(layer).weight, want)
    z = torch.randn(8, 2)
    assert not torch.equal(generator(z), load_model(teacher_file)[0](2.5 * z, torch.full((8,), 2.5)))
    checkpoint = load_file(str(next((tmp_path / "a" / "checkpoints").glob("*.safetensors"))))
    assert not any(k.startswith("task.generator.") and ".lora_" not in k for k in checkpoint)  # adapters only
    interrupted(
        lambda resume, cbs: stages.distill(cfg, data, teacher_file, None, tmp_path / "b", False, resume, cbs), 7
    )
    same_files(tmp_path / "a", tmp_path / "b", ["generator.safetensors", "generator-lora.safetensors"])
    with pytest.raises(DisbackError, match="generator_lora_rank=4 trains adapters on the teacher's weights"):
        stages.distill(cfg, data, teacher_file, None, tmp_path / "c", show_progress=False, generator=tmp_path / "a")
