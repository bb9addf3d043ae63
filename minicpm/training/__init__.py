"""Training the MiniCPM way: pretraining (muP, WSD), fine-tuning (full, LoRA, QLoRA) and DPO.

`run` turns a recipe (`recipe`) into a model (`model_setup`, `lora`, `mup`), tasks
(`task_setup`: `tasks` over `shards` or `data`), an optimizer and schedule (`optimizer_setup`,
`schedules`), picks where the run starts (`resume`), prints what is about to run (`memory`) and
hands all to the `trainer` (`distributed` for FSDP), which writes `checkpoint`s, `logs` and the
run's weights (`outputs`). `command_line` holds the arguments of `minicpm train|pack|merge`;
`tokenizer` trains a tokenizer from a `corpus`.
"""
