/* diamond.h - what the command line's files share: diamond.c (the reference path's commands)
 * and train/commands.c (diamond world and diamond train). */
#ifndef DIAMOND_DIAMOND_H
#define DIAMOND_DIAMOND_H

#include <stdbool.h>

/* What `diamond --version` prints, and what a generated PNG's parameters name. */
#define DIAMOND_VERSION "diamond 2026.12"

/* Seconds on a monotonic clock. */
double now_seconds(void);
/* Whether a command's arguments include --help or -h. */
bool asks_for_help(int argc, char **argv);

/* The commands of train/commands.c: argv holds the arguments after the command's name; returns the
 * exit status (0 success, 1 runtime error, 2 bad command line). */
int world_main(int argc, char **argv);
int train_main(int argc, char **argv);

#endif
