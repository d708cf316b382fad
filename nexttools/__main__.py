from nexttools.cli import main

main()
