"""The factory loop: the iteration, loop control (runs, kill, pause), the heartbeat, presence, the sweep, loop-status's reader."""
