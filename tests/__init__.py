# A guard against a deadlocked test (a hung subprocess, a rank that never joins), never a
# performance limit: how long a test takes depends on the machine and what else runs on it, so
# no test fails for being slow. An hour is far beyond any test's time on the slowest machine
# tried (a 2-core AVX2 CPU shared with other work).
DEADLOCK_GUARD_S = 3600
