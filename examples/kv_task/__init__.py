"""The paper's key-value task at tiny scale: the data generator (make_data), the two tiny models' pretraining
(pretrain), scoring (scoring), `demo.sh` (what `make demo` runs) and its recipe.

Run its modules from the repository root: `python -m examples.kv_task.make_data --out DIR`."""
