"""Files: the one atomic writer; adapter files and Hugging Face PEFT folders."""
