"""Prints a pipeline schedule rank by rank, and draws its simulated timeline.

    python -m deepseek_jax.parallel.pipeline --schedule=dualpipe --ranks=8 --microbatches=20 [--plot=out.png]
"""

from absl import flags

from deepseek_jax import cli
from deepseek_jax.parallel.pipeline import plot, schedules, simulate

_SCHEDULE = flags.DEFINE_enum("schedule", "dualpipe", sorted(schedules.SCHEDULES), "Which schedule to print.")
_RANKS = flags.DEFINE_integer("ranks", 8, "Pipeline ranks P.")
_MICROBATCHES = flags.DEFINE_integer("microbatches", 20, "Micro-batches per step M (both directions together).")
_PLOT = flags.DEFINE_string("plot", None, "If set, also draw the simulated schedule to this PNG path.")


def main(argv: list[str]) -> None:
    del argv
    schedule = schedules.make_schedule(_SCHEDULE.value, _RANKS.value, _MICROBATCHES.value)
    print(schedules.format_schedule(schedule))
    if _PLOT.value:
        plot.plot_timeline(simulate.simulate(schedule, simulate.CostModel()), _PLOT.value)
        print(f"wrote {_PLOT.value}")


if __name__ == "__main__":
    cli.run(main)
