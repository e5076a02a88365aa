"""What the policy is made of and how it reads a conversation: knows tokenizers and chat templates, not SQL or UI."""
