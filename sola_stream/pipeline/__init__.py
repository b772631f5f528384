"""The block loop: skeleton, forward passes and statistics, state cache, resume, plan, memory."""
