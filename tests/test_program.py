"""train/program.py: the one count of a step's model FLOPs, the trainer's and `--mode=compile`'s."""
import jax
import pytest

from configs import demo_shapes
from lidit_jax import aot_cost
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.train import program as program_lib
from lidit_jax.train.inputs import TrainInputs


def test_compile_report_counts_the_model_flops_the_trainer_logs(tiny_llm, tmp_path):
    """The frozen LLM runs in the step (text.cache_dir empty): the report, from the config and
    abstract encoders, and the trainer, from its loaded LLM and inputs, count the same FLOPs."""
    config = demo_shapes.get_config()
    config.text.cache_dir = ""
    config.text.llms.smollm2.update(path=str(tiny_llm), width=32, layer=-2)  # 1 of 2 blocks.
    config.data.shapes_num_records, config.train.batch_size = 16, 8
    config.data.device_prefetch = 0
    devices = jax.devices()
    mesh = mesh_lib.build_mesh(config.mesh, devices)
    inputs = TrainInputs(config, str(tmp_path), mesh)
    try:
        trainer = program_lib.build(config, mesh, inputs.llm_widths, inputs.channels,
                                    inputs.image_hw, inputs.batch_shardings(),
                                    inputs.text_encoders, inputs.encoder_params)
    finally:
        inputs.close()
    dit, step = aot_cost.model_flops_per_chip(config, devices)
    assert step * len(devices) == pytest.approx(trainer.model_flops_per_step, rel=1e-12)
    assert step > dit  # The LLM's forward is in both.
