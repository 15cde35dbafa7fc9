"""What `--mode=compile` compiles: the train step (and the frozen LLMs' programs) for any device
list, a TPU topology's included, from abstract state and batch: nothing is allocated and no
weight is read. The mode and its report: lidit_jax/aot.py; what it costs: aot_cost.py.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from lidit_jax import configuration
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.parallel import sharding
from lidit_jax.text import architectures, features
from lidit_jax.text import encoder as encoder_lib
from lidit_jax.text import weights as weights_lib
from lidit_jax.text.features import pools_layers
from lidit_jax.text.in_step import StateChoice, TextEncoders
from lidit_jax.text.llm import keep_layers
from lidit_jax.text.models import resolve_model_path
from lidit_jax.train import program as program_lib
from lidit_jax.train.inputs import abstract_batch
from lidit_jax.train.state import shardings_of


def topology_devices(topology_name, num_slices=1):
    """The devices of a TPU topology such as 'v5p:4x4x4', described by libtpu (no TPU needed)."""
    from jax.experimental import topologies
    # One host drives up to 4 chips, 2 x 2 x 1 (libtpu wants 3 bounds for 2-D topologies too).
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=topology_name, chips_per_host_bounds=(2, 2, 1),
        num_slices=num_slices)
    return topology.devices


def _encoder_architecture(config, name):
    """The model config (decoder.LLMConfig, bert / t5) of encoder `name`: its config.json or GGUF
    header, no weights."""
    key = f"text.llms.{name}.path"
    llm = config.text.llms[name]
    if not llm.path and llm.get("architecture"):
        return architectures.model_config(llm.architecture, f"text.llms.{name}.architecture")
    if not llm.path:
        raise configuration.ConfigError(
            f"{key} is empty: compiling the online text path (text.cache_dir='') builds the "
            f"LLM from its config.json; set {key} (a folder holding config.json is enough) or "
            f"text.llms.{name}.architecture, or set text.cache_dir to compile the cached path")
    path = pathlib.Path(resolve_model_path(config.text.llms[name].path, key=key))
    if path.is_dir():  # config.json alone: the weights need not be on the compiling host.
        config_json = path / "config.json"
        return weights_lib.config_from_hf(json.loads(config_json.read_text()), name=path.name,
                                          where=str(config_json))
    return weights_lib.open_source(path).config


def abstract_text_encoders(config, mesh, depths=None):
    """(in_step.TextEncoders, [abstract {"weights", "prefix"} with shardings]) of the LLMs the
    train step runs, cut to the layers their chosen states need (or to `depths`, one per LLM:
    cost twins); "prefix": the template prefix's cache where the LLM's tokenizer is there to
    find it (`encoder.configured_prefix`), so the blocks run over the tokens after it only."""
    graphdefs, choices, params = [], [], []
    for k, name in enumerate(features.encoder_names(config.text)):
        llm = config.text.llms[name]
        architecture = _encoder_architecture(config, name)
        module = weights_lib.model_family(architecture)[0]
        model = nnx.eval_shape(lambda: module(architecture, jnp.dtype(llm.dtype),  # noqa: B023
                                              config.text.attention))
        graphdef, state = nnx.split(model)
        choice = StateChoice.of(features.parse(llm.layer, llm.layer_combine, f"text.llms.{name}"),
                                llm.layer_combine, llm.final_norm, architecture.num_layers)
        if depths is not None:
            choice = StateChoice(depths[k], llm.layer_combine, False, architecture.num_layers)
        state = jax.eval_shape(lambda s: keep_layers(s, choice.depth), state)  # noqa: B023
        shardings = sharding.state_shardings(state, mesh, config.mesh.rules)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             state, shardings)
        prefix_ids = encoder_lib.configured_prefix(config.text, name, architecture)
        params.append({"weights": state, "prefix": {} if prefix_ids is None else
                       encoder_lib.abstract_prefix_cache(graphdef, choice, state, prefix_ids,
                                                         mesh, config.mesh.rules)})
        graphdefs.append(graphdef)
        choices.append(choice)
    return TextEncoders(tuple(graphdefs), tuple(choices)), params


def compile_train_step(config, devices):
    """Lowers and compiles one train step on a mesh of `devices`: (compiled, abstract state);
    with text.cache_dir empty, the frozen LLMs inside it."""
    pooling = [n for n in features.encoder_names(config.text) if pools_layers(config.text, n)]
    if pooling:
        raise configuration.ConfigError(
            f"text.llms.{pooling[0]}.layer='attention_pool': compiling without weights needs "
            "the encoder's number of hidden states; not supported (use --mode=describe)")
    configuration.validate(config, num_devices=len(devices))
    mesh = mesh_lib.build_mesh(config.mesh, devices)
    llm_widths = configuration.llm_widths_from_config(config)
    side = config.data.image_size // config.vae.downsample
    batch = abstract_batch(config, mesh, [(w,) for w in llm_widths], config.vae.latent_channels,
                           (side, side))
    # The topology's devices carry their hosts: a mesh the trainer could not feed fails here too.
    sharding.check_batch_rows_per_process(batch["x0"].sharding, config.train.batch_size)
    text_encoders, encoder_args = None, ()
    if not config.text.cache_dir:
        text_encoders, encoder_params = abstract_text_encoders(config, mesh)
        encoder_args = (encoder_params,)
    program = program_lib.build(config, mesh, llm_widths, config.vae.latent_channels,
                                (side, side), shardings_of(batch), text_encoders,
                                *encoder_args)
    state = program.abstract_state
    with jax.set_mesh(mesh), sharding.axis_rules(config.mesh.rules):
        return program.step.lower(state, batch, *encoder_args).compile(), state
