"""The main job, an application of the library: `sparselora-compile finetune` (cli), the
fine-tune loop (train), its data (tasks) and model loading (models). The library never
imports this subpackage."""
