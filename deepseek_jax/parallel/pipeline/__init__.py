"""Pipeline parallelism: schedules as data (schedules.py), their cost-model simulation and plot, the op
tables (tables.py) and the shard_map executor (execute.py, backward_split.py)."""
