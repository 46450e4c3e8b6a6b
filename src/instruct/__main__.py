from src.instruct.cli import main

main()
