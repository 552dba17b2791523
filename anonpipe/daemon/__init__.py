"""The daemon: scheduler, run state machine, audit trail, control socket, systemd glue."""
