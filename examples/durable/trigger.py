"""Start the example runs from another process: sync and async calls mixed, as users write them."""

import asyncio

from examples.durable.worker import simple_durable, steps_then_sleep
from sdk import EmptyModel

ref = simple_durable.run_no_wait(EmptyModel())
print("started", ref.workflow_run_id)
print("steps:", steps_then_sleep.run(EmptyModel()))
print("sleep:", asyncio.run(ref.aio_result()))
