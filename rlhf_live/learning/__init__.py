"""Learning: rounds that turn votes into a new adapter version (reward model, PPO or a direct learner, the gate) on
the trainer's own copy of the model; it never imports serving (it reaches it through the hooks the runtime gives)."""
