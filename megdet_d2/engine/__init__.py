from .trainer import MegDetTrainer, create_ddp_model, set_cpu_threads

__all__ = ["MegDetTrainer", "create_ddp_model", "set_cpu_threads"]
