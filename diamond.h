/* diamond.h - what the command line's files share: diamond.c (the reference path's commands)
 * and train/commands.c (diamond world and diamond train). */
#ifndef DIAMOND_DIAMOND_H
#define DIAMOND_DIAMOND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "io.h"

/* What `diamond --version` prints, and what a generated PNG's parameters name. */
#define DIAMOND_VERSION "diamond 2026.12"

/* Seconds on a monotonic clock. */
double now_seconds(void);
/* Whether a command's arguments include --help or -h. */
bool asks_for_help(int argc, char **argv);

/* --- options: each command's declared in one table ---
 * An option names a field of the command's arguments struct by its offset, its kind says how
 * the value is read, and its help is what --help prints; options_parse and options_help are
 * the only parser and the only help layout. */
typedef enum OptionKind {
    OPTION_FLAG,  /* no value: the bool field becomes true */
    OPTION_TEXT,  /* the value as it is (a path, a prompt): a const char * field */
    OPTION_INT,   /* a whole number in [min, max]: an int field */
    OPTION_FLOAT, /* a number in [min, max]: a float field */
    OPTION_DOUBLE, /* the same into a double field */
    OPTION_PARSE, /* parse(value, field, e): anything else (value NULL for a flag) */
} OptionKind;

typedef struct Option {
    const char *name;  /* "--steps", "-W" */
    const char *value; /* the value's name in the help ("N", "DIR"); NULL: takes none */
    OptionKind kind;
    size_t offset;     /* the field, from the start of the arguments struct */
    double min, max;   /* OPTION_INT, OPTION_FLOAT */
    int (*parse)(const char *value, void *field, Error *e); /* OPTION_PARSE; 0 or an error */
    const char *fallback; /* the value when the option is not given, as typed ("4", "power");
                             NULL: none, or one the command works out (its help says which) */
    const char *help;  /* lines joined by '\n'; NULL: left out of the help */
} Option;

/* One table and the struct its offsets point into. used: set when one of its options was
 * given. */
typedef struct OptionSet {
    const Option *options;
    size_t count;
    void *args;
    bool used;
} OptionSet;

/* argv[0 .. argc) against the sets, in order; the first unknown option, missing value or bad
 * value is an error naming it (`command` names the --help to read; NULL: diamond help). */
int options_parse(OptionSet *sets, int n_sets, int argc, char **argv, const char *command,
                  Error *e);
/* Every option's fallback into its field, as if given: what the command line then overrides. */
int options_defaults(OptionSet *sets, int n_sets, Error *e);
/* Every option with a help, one entry each: name and value, then the help's lines aligned, and
 * "(default X)" for an option with a fallback. */
void options_help(FILE *f, const OptionSet *sets, int n_sets);
/* A model directory's own sampling defaults: <model>/sampling.json, an object of options and
 * their values ({"--steps": 16, "-W": 64, "--loss": "mse"}), parsed into the sets as if they came
 * before the command line, so that its flags override them. Only -W, -H, --steps, --mu, --cfg,
 * --guidance-scale, --lambda-schedule, --loss and --gate may appear; an absent file sets
 * nothing. model_defaults finds --model in argv first. */
#define MODEL_DEFAULTS_FILE "sampling.json"
int model_defaults_read(const char *model, OptionSet *sets, int n_sets, const char *command,
                        Error *e);
int model_defaults(OptionSet *sets, int n_sets, int argc, char **argv, const char *command,
                   Error *e);
/* A command's --help on stdout: usage (its synopsis and description), the options, the exit
 * statuses. */
void command_help(const char *usage, const OptionSet *sets, int n_sets);
/* OPTION_PARSE for a seed (0..2^63-1, eval's and JSON's range) into a uint64_t field. */
int option_seed(const char *value, void *field, Error *e);
/* OPTION_PARSE for --threads T (1..1024, an int field): OpenMP's thread count, for the whole
 * process (a note on stderr without OpenMP). */
int option_threads(const char *value, void *field, Error *e);

/* The commands of train/commands.c: argv holds the arguments after the command's name; returns the
 * exit status (0 success, 1 runtime error, 2 bad command line). */
int world_main(int argc, char **argv);
int train_main(int argc, char **argv);

#endif
