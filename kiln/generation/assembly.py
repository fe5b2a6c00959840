"""Putting an engine together: the model, its KV slot pool, the runner (with the decode step
captured), the scheduler and the stepper.

A threaded engine does this on its own thread, so that every PyTorch operation of the
engine, the load and the capture included, runs in that one thread. Parallel regions of two
threads (the caller's, the engine's) make two OpenMP thread teams, which slow each other
down: measured on an AMD EPYC with 2 cores, decode steps ran 13-15% slower on the engine's
thread after the model had been loaded on the caller's, and as fast as on the main thread
when the engine's thread had done everything itself.
"""

from __future__ import annotations

import torch

from .config import EngineConfig
from .draft import open_draft
from .intake import Intake
from .loaded_model import LoadedModel, open_model
from .proposers import Speculation
from .runner import ModelRunner
from .scheduler import Scheduler
from .sizing import kv_cache_dtype, slot_count
from .slots import SlotPool
from .speculation import SpeculationStats
from .static_step import KV_BUCKET
from .stepper import Registry, Stepper
from .updater import Updater


def assemble(engine, model, config: EngineConfig) -> None:
    """Load `model` (unless it is a LoadedModel already) and give `engine` its parts."""
    engine.loaded = loaded = model if isinstance(model, LoadedModel) else open_model(
        model, **config.load_options())
    engine.kv_cache_dtype = kv_cache_dtype(loaded, config.kv_cache_dtype)
    context = loaded.spec.max_position_embeddings
    slot_length = min(config.max_length or context, context)
    slots = slot_count(loaded, config, slot_length, engine.kv_cache_dtype)
    engine.pool = pool = SlotPool(loaded.model.spec, slots, slot_length, engine.kv_cache_dtype,
                                  loaded.device)
    engine.runner = runner = ModelRunner(loaded.model, pool.cache, loaded.device,
                                         config.static_decode)
    engine.draft = None if config.draft_model is None else open_draft(
        config, loaded, pool.num_slots, pool.slot_length, engine.kv_cache_dtype)
    rng = torch.Generator(device=loaded.device)
    rng.manual_seed(config.seed if config.seed is not None else torch.seed())
    engine.intake = Intake(loaded, slot_length, rng, engine.draft is not None)
    engine.builder = engine.intake.builder
    engine.scheduler = Scheduler(pool, config.prefill_budget(loaded.device.type),
                                 runner.static_prompts.__contains__)
    engine.speculation = SpeculationStats()
    engine._registry = Registry()
    engine._stepper = Stepper(engine._registry, engine.scheduler, runner,
                              Updater(pool, loaded.spec.usable_vocab_size, runner.copy_rows,
                                      engine.speculation),
                              Speculation(engine.draft))
    engine.timing = engine._stepper.timing  # StepTiming: forward passes vs host time
    # callbacks run on the engine's thread each time a batch of events has been handed out
    engine.after_delivery = engine._stepper.after_delivery
    with torch.inference_mode():  # the decode step's capture, before any request waits
        runner.warm_up(KV_BUCKET)
